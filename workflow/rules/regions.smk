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
        on_error=config["on_error"],
        cap=config["segmentation"]["memory_cap_gb"],
        pictures=config["regions"]["qc_pictures"],
        decoder=config["regions"]["decoder"],
    shell:
        "python -m pipeline.regions --manifest {input.manifest} --shard {wildcards.shard} --segment {input.segment}"
        " --table {input.table} --out {output.masks} --qc {output.qc} --pictures {output.pictures}"
        " --n-pictures {params.pictures} --memory-cap-gb {params.cap} --on-error {params.on_error}"
        " --decoder {params.decoder}"
        " --threads {threads} > {log} 2>&1"
