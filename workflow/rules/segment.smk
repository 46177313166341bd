rule segment:
    input:
        manifest=f"{RES}/cohort.parquet",
    output:
        f"{RES}/segment/shard-{{shard}}.parquet",
    params:
        backend=config["segmentation"]["backend"],
        on_error=config["on_error"],
    log:
        f"{RES}/logs/segment/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/segment/shard-{{shard}}.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.segment --manifest {input.manifest} --shard {wildcards.shard}"
        " --backend {params.backend} --on-error {params.on_error} --out {output} > {log} 2>&1"
