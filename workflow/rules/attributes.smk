rule attributes:
    input:
        masks=f"{RES}/masks/shard-{{shard}}.zarr",
    output:
        table=f"{RES}/attributes/shard-{{shard}}.parquet",
        qc=f"{RES}/qc/attributes/shard-{{shard}}.parquet",
    log:
        f"{RES}/logs/attributes/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/attributes/shard-{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/pipeline.yaml"
    threads: config["attributes"]["threads"]
    params:
        cfg=as_json(without(config["attributes"], "threads")),  # threads: the job's --threads
        on_error=config["on_error"],
    shell:
        "python -m pipeline.attributes --masks {input.masks} --out {output.table} --qc {output.qc}"
        " --params-json {params.cfg} --on-error {params.on_error} --threads {threads} > {log} 2>&1"
