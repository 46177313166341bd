# Demo-only inputs: the synthetic cohort and the tiny stand-in encoder / LLM, written to local folders.
# Each is defined only when the config asks for it, so no rule can overwrite real data or weights.


if config["dataset"]["adapter"] == "demo":

    rule demo_cohort:
        output:
            directory(f"{RES}/demo/cohort"),
        params:
            n_cases=config["dataset"].get("demo", {}).get("n_cases", 80),
            seed=config["dataset"].get("demo", {}).get("seed", 0),
            planted=demo_findings_args(config["dataset"].get("demo", {})),
        log:
            f"{RES}/logs/demo_cohort.log",
        benchmark:
            f"{RES}/benchmarks/demo_cohort.tsv"
        threads: 2
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m pipeline.demo_cohort --out {output} --n-cases {params.n_cases} --seed {params.seed}"
            " --workers {threads} {params.planted} > {log} 2>&1"


if config["features"]["encoder"].get("build_demo", False):

    rule demo_encoder:
        output:
            directory(config["features"]["encoder"]["path"]),
        params:
            hidden=config["features"]["encoder"].get("demo_hidden_size", 64),
            layers=config["features"]["encoder"].get("demo_layers", 4),
            channels=len(config["features"].get("channel_windows") or [None] * 3),
            means="--channel-means" if config["features"]["encoder"].get("demo_channel_means", False) else "",
        log:
            f"{RES}/logs/demo_encoder.log",
        benchmark:
            f"{RES}/benchmarks/demo_encoder.tsv"
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m pipeline.features demo-encoder --out {output} --hidden-size {params.hidden}"
            " --layers {params.layers} --channels {params.channels} {params.means} > {log} 2>&1"


if config["llm"].get("build_demo", False):
    # llm.demo_attribute_text: the demo LM also reads the prompts' attribute text in pre-training
    # (off: the rule's command is the one runs made before the key existed, so they do not rerun)
    DEMO_ATTRIBUTE_TEXT = config["llm"].get("demo_attribute_text", False)
    # llm.demo_init_std: unset leaves the command (and LLaMA's 0.02) as before

    rule demo_llm:
        input:
            train=f"{RES}/reports/train.parquet",
            attributes=shard_files(f"{RES}/attributes/shard-{{shard}}.parquet") if DEMO_ATTRIBUTE_TEXT else [],
        output:
            directory(config["llm"]["path"]),
        params:
            hidden=config["llm"].get("demo_hidden_size", 128),
            layers=config["llm"].get("demo_layers", 2),
            vocab=config["llm"].get("demo_vocab_size", 2000),
            seed=config["llm"].get("demo_seed", 0),
            pretrain_steps=config["llm"].get("demo_pretrain_steps", 300),
        log:
            f"{RES}/logs/demo_llm.log",
        benchmark:
            f"{RES}/benchmarks/demo_llm.tsv"
        threads: 2
        conda:
            "../../envs/train.yaml"
        shell:
            "python -m model.demo_llm --reports {input.train} --out {output} --hidden-size {params.hidden}"
            " --layers {params.layers} --vocab-size {params.vocab} --seed {params.seed}"
            " --pretrain-steps {params.pretrain_steps}"
            + (" --attributes {input.attributes}" if DEMO_ATTRIBUTE_TEXT else "")
            + (f" --init-std {config['llm']['demo_init_std']}" if "demo_init_std" in config["llm"] else "")
            + " > {log} 2>&1"
