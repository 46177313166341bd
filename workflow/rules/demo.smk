# Demo-only inputs: the synthetic cohort and the tiny stand-in encoder / LLM, written to local folders.
# Each is defined only when the config asks for it, so no rule can overwrite real data or weights.
ENCODER = config["features"]["encoder"]
DEMO_LLM = {
    key: value for key, value in config["llm"].items() if key.startswith("demo_")
}


if config["dataset"]["adapter"] == "demo":

    rule demo_cohort:
        output:
            directory(f"{RES}/demo/cohort"),
        log:
            f"{RES}/logs/demo_cohort.log",
        benchmark:
            f"{RES}/benchmarks/demo_cohort.tsv"
        conda:
            "../../envs/pipeline.yaml"
        threads: 2
        params:
            cfg=as_json(config["dataset"]["demo"]),
        shell:
            "python -m pipeline.demo_cohort --out {output} --params-json {params.cfg} --workers {threads} > {log} 2>&1"


if ENCODER["build_demo"]:

    rule demo_encoder:
        output:
            directory(ENCODER["path"]),
        log:
            f"{RES}/logs/demo_encoder.log",
        benchmark:
            f"{RES}/benchmarks/demo_encoder.tsv"
        conda:
            "../../envs/pipeline.yaml"
        params:
            cfg=as_json(
                {
                    "demo_hidden_size": ENCODER["demo_hidden_size"],
                    "demo_layers": ENCODER["demo_layers"],
                    "demo_channel_means": ENCODER["demo_channel_means"],
                    "channel_windows": config["features"][
                        "channel_windows"
                    ],  # one input channel per window
                }
            ),
        shell:
            "python -m pipeline.features demo-encoder --out {output} --params-json {params.cfg} > {log} 2>&1"


if config["llm"]["build_demo"]:

    rule demo_llm:
        input:
            train=f"{RES}/reports/train.parquet",
            # llm.demo_attribute_text: the demo LM also reads the prompts' attribute text in pre-training
            attributes=(
                shard_files(f"{RES}/attributes/shard-{{shard}}.parquet")
                if DEMO_LLM["demo_attribute_text"]
                else []
            ),
        output:
            directory(config["llm"]["path"]),
        log:
            f"{RES}/logs/demo_llm.log",
        benchmark:
            f"{RES}/benchmarks/demo_llm.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 2
        params:
            cfg=as_json(DEMO_LLM),
        shell:
            "python -m model.demo_llm --reports {input.train} --params-json {params.cfg} --out {output}"
            " --attributes {input.attributes} > {log} 2>&1"
