# Regions stage (pipeline/regions): one bit-packed channel array per volume, a QC table and overlay pictures.
rule regions:
    input:
        manifest=f"{RES}/cohort.parquet",
        segment=f"{RES}/segment/shard-{{shard}}.parquet",
        table=repo_file(config["regions_table"]),
    output:
        masks=directory(f"{RES}/masks/shard-{{shard}}.zarr"),
        qc=report(
            f"{RES}/qc/regions/shard-{{shard}}.parquet",
            caption="../report/regions.rst",
            category="QC",
            subcategory="regions",
        ),
        pictures=report(
            directory(f"{RES}/qc/regions/shard-{{shard}}"),
            patterns=["{volume}.png"],
            caption="../report/regions_picture.rst",
            category="QC",
            subcategory="region overlays",
        ),
    log:
        f"{RES}/logs/regions/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/regions/shard-{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/pipeline.yaml"
    threads: config["regions"]["threads"]
    resources:
        mem_mb=4000,
    params:
        cfg=as_json(
            {
                "qc_pictures": config["regions"]["qc_pictures"],
                "decoder": config["regions"]["decoder"],
                "memory_cap_gb": config["segmentation"]["memory_cap_gb"],
            }
        ),
        on_error=config["on_error"],
    shell:
        "python -m pipeline.regions --manifest {input.manifest} --shard {wildcards.shard} --segment {input.segment}"
        " --table {input.table} --out {output.masks} --qc {output.qc} --pictures {output.pictures}"
        " --params-json {params.cfg} --on-error {params.on_error} --threads {threads} > {log} 2>&1"
