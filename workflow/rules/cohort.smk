rule cohort:
    input:
        dataset_inputs(),
    output:
        manifest=f"{RES}/cohort.parquet",
    params:
        volumes=dataset()["volumes_dir"],
        masks=dataset()["masks_dir"],
        reports=dataset()["reports_csv"],
        splits=f"--splits-csv {dataset()['splits_csv']}" if dataset().get("splits_csv") else "",
        validation=dataset().get("validation_fraction", 0.15),
        shard_size=config["shard_size"],
        n_volumes=N_VOLUMES,
    log:
        f"{RES}/logs/cohort.log",
    benchmark:
        f"{RES}/benchmarks/cohort.tsv"
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.cohort --volumes-dir {params.volumes} --masks-dir {params.masks}"
        " --reports-csv {params.reports} {params.splits} --validation-fraction {params.validation}"
        " --shard-size {params.shard_size} --expect-volumes {params.n_volumes} --out {output.manifest} > {log} 2>&1"
