rule attributes:
    input:
        masks=f"{RES}/masks/shard-{{shard}}.zarr",
    output:
        f"{RES}/attributes/shard-{{shard}}.parquet",
    log:
        f"{RES}/logs/attributes/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/attributes/shard-{{shard}}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.attributes --masks {input.masks} --out {output} > {log} 2>&1"
