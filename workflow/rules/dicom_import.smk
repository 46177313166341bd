# Own data: the DICOM series folders of the table (dataset.adapter: manifest) become NIfTI volumes,
# one job per shard holding DICOM rows (pipeline/own_data.py, pipeline/dicom.py): slices ordered by
# position, rescale applied, geometry kept, no DICOM tag copied.
if config["dataset"]["adapter"] == "manifest":

    rule dicom_import:
        input:
            table=dataset()["manifest"],
        output:
            volumes=directory(f"{RES}/dicom/shard-{{shard}}"),
            qc=f"{RES}/qc/dicom/shard-{{shard}}.parquet",
        log:
            f"{RES}/logs/dicom_import/shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/dicom_import/shard-{{shard}}.tsv"
        wildcard_constraints:
            shard=r"\d+",
        conda:
            "../../envs/pipeline.yaml"
        params:
            shard_size=config["shard_size"],
            on_error=config["on_error"],
        shell:
            "python -m pipeline.own_data dicom --table {input.table} --shard {wildcards.shard}"
            " --shard-size {params.shard_size} --out {output.volumes} --qc {output.qc}"
            " --on-error {params.on_error} > {log} 2>&1"
