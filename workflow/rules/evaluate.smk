# Evaluation: metrics.json per experiment (NLG, CA-F1, optional GREEN and LLM judge), then the Table-1
# ablation table and the per-class CA table. Settings: the `evaluate:` section of the config (schema).
EVAL = config.get("evaluate") or {}


def green_config():
    """The GREEN settings when a local model folder is configured, else None (GREEN shown as not run)."""
    g = EVAL.get("green") or {}
    return g if g.get("model") else None


def judge_config():
    """The LLM-judge settings when an endpoint and a model are configured, else None (shown as not run)."""
    j = EVAL.get("judge") or {}
    return j if j.get("endpoint") and j.get("model") else None


def evaluate_inputs(wildcards):
    files = {
        "predictions": f"{RES}/experiments/{wildcards.exp}/predictions.parquet",
        "references": f"{RES}/reports/test.parquet",
        "qc": skip_qc_tables(wildcards),  # the skipped volumes, counted in metrics.json
    }
    if green_config():
        files["green"] = f"{RES}/experiments/{wildcards.exp}/green.json"
    if judge_config():
        files["judge"] = f"{RES}/experiments/{wildcards.exp}/judge.json"
    return files


def bootstrap_flags():
    """Resamples and seed of the bootstrap CIs and paired tests (config evaluate.bootstrap)."""
    b = EVAL.get("bootstrap") or {}
    return ["--bootstrap-resamples", str(b.get("resamples", 1000)), "--seed", str(b.get("seed", 0))]


def evaluate_flags(wildcards, input):
    lab = EVAL.get("labeler") or {}
    flags = ["--labeler", lab.get("backend", "rules"), "--labeler-device", lab.get("device", "cpu")]
    if lab.get("weights"):
        flags += ["--labeler-weights", repo_file(lab["weights"])]
    if lab.get("model_dir"):
        flags += ["--labeler-model-dir", repo_file(lab["model_dir"])]
    if EVAL.get("java"):
        flags += ["--java", EVAL["java"]]
    if EVAL.get("wordnet"):  # null: Debian's wordnet-base folder ('METEOR evaluate' not run without it)
        flags += ["--wordnet", repo_file(EVAL["wordnet"])]
    flags += bootstrap_flags()
    if "green" in input.keys():
        flags += ["--green", input.green]
    if "judge" in input.keys():
        flags += ["--judge", input.judge]
    flags += ["--skipped-qc", *input.qc]
    return " ".join(shlex.quote(str(f)) for f in flags)


if green_config():

    rule green:
        input:
            predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
            references=f"{RES}/reports/test.parquet",
        output:
            f"{RES}/experiments/{{exp}}/green.json",
        params:
            model=lambda wc: repo_file(green_config()["model"]),
            opts=lambda wc: (
                f"--device {green_config().get('device', 'auto')} --dtype {green_config().get('dtype', 'auto')}"
                f" --batch-size {green_config().get('batch_size', 4)}"
                f" --max-new-tokens {green_config().get('max_new_tokens', 1024)}"
                f" --max-length {green_config().get('max_length', 2048)}"
            ),
        resources:
            gpu=lambda wc: int(green_config().get("gpus", 1)),
        log:
            f"{RES}/logs/green/{{exp}}.log",
        benchmark:
            f"{RES}/benchmarks/green/{{exp}}.tsv"
        conda:
            "../../envs/evaluate.yaml"
        shell:
            "python -m pipeline.evaluate.green --predictions {input.predictions} --references {input.references}"
            " --model {params.model:q} {params.opts} --out {output} > {log} 2>&1"


if judge_config():

    rule judge:
        input:
            predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
            references=f"{RES}/reports/test.parquet",
        output:
            f"{RES}/experiments/{{exp}}/judge.json",
        params:
            endpoint=lambda wc: judge_config()["endpoint"],
            model=lambda wc: judge_config()["model"],
            opts=lambda wc: " ".join(
                [
                    f"--max-workers {judge_config().get('max_workers', 4)}",
                    f"--timeout {judge_config().get('timeout_s', 120)}",
                    f"--retries {judge_config().get('retries', 3)}",
                    f"--max-tokens {judge_config().get('max_tokens', 256)}",
                ]
                + ([f"--api-key-env {judge_config()['api_key_env']}"] if judge_config().get("api_key_env") else [])
            ),
        log:
            f"{RES}/logs/judge/{{exp}}.log",
        benchmark:
            f"{RES}/benchmarks/judge/{{exp}}.tsv"
        conda:
            "../../envs/evaluate.yaml"
        shell:
            "python -m pipeline.evaluate.judge --predictions {input.predictions} --references {input.references}"
            " --endpoint {params.endpoint:q} --model {params.model:q} {params.opts} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        unpack(evaluate_inputs),
    output:
        metrics=report(
            f"{RES}/experiments/{{exp}}/metrics.json",
            caption="../report/metrics.rst",
            category="Results",
            subcategory="metrics.json per experiment",
            labels={"experiment": "{exp}"},
        ),
        scores=report(
            f"{RES}/experiments/{{exp}}/scores.parquet",
            caption="../report/scores.rst",
            category="Results",
            subcategory="Per-volume scores",
            labels={"experiment": "{exp}"},
        ),
    params:
        flags=evaluate_flags,
    log:
        f"{RES}/logs/evaluate/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{exp}}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m pipeline.evaluate --predictions {input.predictions} --references {input.references}"
        " --experiment {wildcards.exp} --out {output.metrics} --scores-out {output.scores} {params.flags} > {log} 2>&1"


rule ablation_table:
    input:
        metrics=expand(f"{RES}/experiments/{{exp}}/metrics.json", exp=list(config["experiments"])),
        scores=expand(f"{RES}/experiments/{{exp}}/scores.parquet", exp=list(config["experiments"])),
    output:
        csv=report(f"{RES}/tables/ablation.csv", caption="../report/ablation.rst", category="Results",
                   subcategory="Ablation table"),
        md=report(f"{RES}/tables/ablation.md", caption="../report/ablation.rst", category="Results",
                  subcategory="Ablation table"),
        png=report(f"{RES}/tables/ablation.png", caption="../report/ablation.rst", category="Results",
                   subcategory="Ablation table"),
        ca_csv=report(f"{RES}/tables/ca_per_class.csv", caption="../report/ca_per_class.rst", category="Results",
                      subcategory="Clinical accuracy per class"),
        ca_md=report(f"{RES}/tables/ca_per_class.md", caption="../report/ca_per_class.rst", category="Results",
                     subcategory="Clinical accuracy per class"),
    params:
        out_dir=f"{RES}/tables",
        # the paired comparison is against `full` (the paper's model); flags as the evaluate rule's
        flags=lambda wc: " ".join(["--baseline", str(EVAL.get("baseline", "full")), *bootstrap_flags()]),
    log:
        f"{RES}/logs/ablation_table.log",
    benchmark:
        f"{RES}/benchmarks/ablation_table.tsv"
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m pipeline.evaluate.table --metrics {input.metrics} --scores {input.scores}"
        " --out-dir {params.out_dir} {params.flags} > {log} 2>&1"
