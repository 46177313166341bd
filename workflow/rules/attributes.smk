rule attributes:
    wildcard_constraints:
        shard=r"\d+",
    input:
        masks=f"{RES}/masks/shard-{{shard}}.zarr",
    output:
        table=f"{RES}/attributes/shard-{{shard}}.parquet",
        qc=f"{RES}/qc/attributes/shard-{{shard}}.parquet",
    params:
        cfg=as_json(without(config["attributes"], "threads")),  # threads: the job's --threads
        on_error=config["on_error"],
    log:
        f"{RES}/logs/attributes/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/attributes/shard-{{shard}}.tsv"
    threads: config["attributes"]["threads"]
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.attributes --masks {input.masks} --out {output.table} --qc {output.qc}"
        " --params-json {params.cfg} --on-error {params.on_error} --threads {threads} > {log} 2>&1"
