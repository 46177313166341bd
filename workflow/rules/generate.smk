def decoding_flags():
    """Greedy by default; beam search (num_beams > 1) or sampling (do_sample) from config["generate"]."""
    g = config["generate"]
    flags = f"--num-beams {g['num_beams']}"
    if g["do_sample"]:
        flags += f" --do-sample --temperature {g['temperature']} --top-p {g['top_p']} --seed {g['seed']}"
    return flags


rule generate:
    input:
        model=f"{RES}/experiments/{{exp}}/stage2/medregion_config.json",
        features=experiment_features,
        attributes=shard_files(f"{RES}/attributes/shard-{{shard}}.parquet"),
        test=f"{RES}/reports/test.parquet",
        qc=skip_qc_tables,  # volumes skipped under on_error: skip get no prediction
    output:
        f"{RES}/experiments/{{exp}}/predictions.parquet",
    params:
        model_dir=lambda w: f"{RES}/experiments/{w.exp}/stage2",
        max_new_tokens=config["generate"]["max_new_tokens"],
        batch_size=config["generate"]["batch_size"],
        decoding=decoding_flags(),
    log:
        f"{RES}/logs/generate/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/generate/{{exp}}.tsv"
    threads: 2
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m model.generate --model {params.model_dir} --features {input.features}"
        " --attributes {input.attributes} --reports {input.test} --skipped-qc {input.qc} --out {output}"
        " --max-new-tokens {params.max_new_tokens} --batch-size {params.batch_size} {params.decoding}"
        " > {log} 2>&1"
