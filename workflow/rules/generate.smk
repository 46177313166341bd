# Generation: the test split's reports of each experiment (model/generate.py), settings from `generate:`.


rule generate:
    input:
        model=f"{RES}/experiments/{{exp}}/stage2/medregion_config.json",
        features=experiment_features,
        attributes=shard_files(f"{RES}/attributes/shard-{{shard}}.parquet"),
        test=f"{RES}/reports/test.parquet",
        qc=skip_qc_tables,  # volumes skipped under on_error: skip get no prediction
    output:
        f"{RES}/experiments/{{exp}}/predictions.parquet",
    log:
        f"{RES}/logs/generate/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/generate/{{exp}}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    params:
        model_dir=lambda wildcards, input: Path(input.model).parent,
        cfg=as_json(config["generate"]),
    shell:
        "python -m model.generate --model {params.model_dir} --features {input.features}"
        " --attributes {input.attributes} --reports {input.test} --skipped-qc {input.qc}"
        " --params-json {params.cfg} --out {output} > {log} 2>&1"
