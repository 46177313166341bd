rule reports:
    input:
        manifest=f"{RES}/cohort.parquet",
        table=repo_file(config["regions_table"]),
        # own data: the table's region texts and labels, written by the cohort rule
        truth=(
            dataset()["region_report_csv"] + dataset()["labels_csv"]
            if config["dataset"]["adapter"] == "manifest"
            else []
        ),
    output:
        expand(
            f"{RES}/reports/{{split}}.parquet", split=["train", "validation", "test"]
        ),
    log:
        f"{RES}/logs/reports.log",
    benchmark:
        f"{RES}/benchmarks/reports.tsv"
    conda:
        "../../envs/pipeline.yaml"
    params:
        out_dir=lambda wildcards, output: Path(output[0]).parent,
        region_csv=dataset()["region_report_csv"],
        labels_csv=dataset()["labels_csv"],
    shell:
        "python -m pipeline.reports --manifest {input.manifest} --region-csv {params.region_csv}"
        " --labels-csv {params.labels_csv} --table {input.table} --out-dir {params.out_dir} > {log} 2>&1"
