if config["dataset"]["adapter"] == "manifest":
    # Own data (pipeline/own_data.py): the table's DICOM rows are converted first (dicom_import.smk);
    # the cohort job checks every file and writes the ground truth the reports stage reads.

    rule cohort:
        input:
            table=dataset()["manifest"],
            dicom=expand(f"{RES}/dicom/shard-{{shard}}", shard=DICOM_SHARDS),
        output:
            manifest=f"{RES}/cohort.parquet",
            region_report=f"{RES}/cohort/region_report.csv",
            labels=f"{RES}/cohort/labels.csv",
        log:
            f"{RES}/logs/cohort.log",
        benchmark:
            f"{RES}/benchmarks/cohort.tsv"
        conda:
            "../../envs/pipeline.yaml"
        params:
            shard_size=config["shard_size"],
            n_volumes=N_VOLUMES,
            require_masks=(
                "--require-masks"
                if config["segmentation"]["backend"] == "precomputed"
                else ""
            ),
        shell:
            "python -m pipeline.cohort --adapter manifest --table {input.table} --dicom-dir {RES}/dicom"
            " {params.require_masks} --truth-dir {RES}/cohort --shard-size {params.shard_size}"
            " --expect-volumes {params.n_volumes} --out {output.manifest} > {log} 2>&1"

else:

    rule cohort:
        input:
            dataset_inputs(),
        output:
            manifest=f"{RES}/cohort.parquet",
        log:
            f"{RES}/logs/cohort.log",
        benchmark:
            f"{RES}/benchmarks/cohort.tsv"
        conda:
            "../../envs/pipeline.yaml"
        params:
            volumes=dataset()["volumes_dir"],
            masks=dataset()["masks_dir"],
            reports=dataset()["reports_csv"],
            splits=(
                f"--splits-csv {dataset()['splits_csv']}"
                if dataset()["splits_csv"]
                else ""
            ),
            validation=dataset()["validation_fraction"],
            shard_size=config["shard_size"],
            n_volumes=N_VOLUMES,
        shell:
            "python -m pipeline.cohort --volumes-dir {params.volumes} --masks-dir {params.masks}"
            " --reports-csv {params.reports} {params.splits} --validation-fraction {params.validation}"
            " --shard-size {params.shard_size} --expect-volumes {params.n_volumes} --out {output.manifest} > {log} 2>&1"
