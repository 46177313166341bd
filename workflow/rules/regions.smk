rule regions:
    input:
        manifest=f"{RES}/cohort.parquet",
        segment=f"{RES}/segment/shard-{{shard}}.parquet",
        table=repo_file(config["regions_table"]),
    output:
        masks=directory(f"{RES}/masks/shard-{{shard}}.zarr"),
        qc=report(f"{RES}/qc/regions/shard-{{shard}}.parquet", caption="../report/regions.rst",
                  category="QC"),
    params:
        on_error=config["on_error"],
    log:
        f"{RES}/logs/regions/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/regions/shard-{{shard}}.tsv"
    threads: 2
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.regions --manifest {input.manifest} --shard {wildcards.shard}"
        " --table {input.table} --out {output.masks} --qc {output.qc} --on-error {params.on_error}"
        " --threads {threads} > {log} 2>&1"
