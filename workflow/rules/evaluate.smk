# Evaluation: metrics.json per experiment (NLG, CA-F1, optional GREEN and LLM judge), then the Table-1
# ablation table and the per-class CA table. Settings: the `evaluate:` section of the config (schema).
from pipeline.config_check import without

EVAL = config["evaluate"]  # defaults filled by the Snakefile's validate
GREEN = EVAL["green"]
JUDGE = EVAL["judge"]
RUN_GREEN = GREEN["model"] is not None  # model null: GREEN shown as not run
# endpoint or model null: judge not run
RUN_JUDGE = JUDGE["endpoint"] is not None and JUDGE["model"] is not None
LABELER = EVAL["labeler"]
EVALUATE_SETTINGS = {
    "java": EVAL["java"],
    "wordnet": None if EVAL["wordnet"] is None else repo_file(EVAL["wordnet"]),
    "labeler": {
        **LABELER,
        "weights": (
            None if LABELER["weights"] is None else repo_file(LABELER["weights"])
        ),
        "model_dir": (
            None if LABELER["model_dir"] is None else repo_file(LABELER["model_dir"])
        ),
    },
    "bootstrap": EVAL["bootstrap"],
}


if RUN_GREEN:

    rule green:
        input:
            predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
            references=f"{RES}/reports/test.parquet",
        output:
            f"{RES}/experiments/{{exp}}/green.json",
        log:
            f"{RES}/logs/green/{{exp}}.log",
        benchmark:
            f"{RES}/benchmarks/green/{{exp}}.tsv"
        conda:
            "../../envs/evaluate.yaml"
        resources:
            gpu=GREEN["gpus"],
        params:
            model=repo_file(GREEN["model"]),
            cfg=as_json(without(GREEN, "model", "gpus")),
        shell:
            "python -m pipeline.evaluate.green --predictions {input.predictions} --references {input.references}"
            " --model {params.model:q} --params-json {params.cfg} --out {output} > {log} 2>&1"


if RUN_JUDGE:

    rule judge:
        input:
            predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
            references=f"{RES}/reports/test.parquet",
        output:
            f"{RES}/experiments/{{exp}}/judge.json",
        log:
            f"{RES}/logs/judge/{{exp}}.log",
        benchmark:
            f"{RES}/benchmarks/judge/{{exp}}.tsv"
        conda:
            "../../envs/evaluate.yaml"
        params:
            cfg=as_json(JUDGE),
        shell:
            "python -m pipeline.evaluate.judge --predictions {input.predictions} --references {input.references}"
            " --params-json {params.cfg} --out {output} > {log} 2>&1"


rule evaluate:
    input:
        predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
        references=f"{RES}/reports/test.parquet",
        qc=skip_qc_tables,  # the skipped volumes, counted in metrics.json
        green=f"{RES}/experiments/{{exp}}/green.json" if RUN_GREEN else [],
        judge=f"{RES}/experiments/{{exp}}/judge.json" if RUN_JUDGE else [],
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
    log:
        f"{RES}/logs/evaluate/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{exp}}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    params:
        cfg=as_json(EVALUATE_SETTINGS),
    shell:
        "python -m pipeline.evaluate --predictions {input.predictions} --references {input.references}"
        " --experiment {wildcards.exp} --params-json {params.cfg} --green {input.green} --judge {input.judge}"
        " --skipped-qc {input.qc} --out {output.metrics} --scores-out {output.scores} > {log} 2>&1"


rule ablation_table:
    input:
        metrics=expand(
            f"{RES}/experiments/{{exp}}/metrics.json", exp=list(config["experiments"])
        ),
        scores=expand(
            f"{RES}/experiments/{{exp}}/scores.parquet",
            exp=list(config["experiments"]),
        ),
    output:
        csv=report(
            f"{RES}/tables/ablation.csv",
            caption="../report/ablation.rst",
            category="Results",
            subcategory="Ablation table",
        ),
        md=report(
            f"{RES}/tables/ablation.md",
            caption="../report/ablation.rst",
            category="Results",
            subcategory="Ablation table",
        ),
        png=report(
            f"{RES}/tables/ablation.png",
            caption="../report/ablation.rst",
            category="Results",
            subcategory="Ablation table",
        ),
        ca_csv=report(
            f"{RES}/tables/ca_per_class.csv",
            caption="../report/ca_per_class.rst",
            category="Results",
            subcategory="Clinical accuracy per class",
        ),
        ca_md=report(
            f"{RES}/tables/ca_per_class.md",
            caption="../report/ca_per_class.rst",
            category="Results",
            subcategory="Clinical accuracy per class",
        ),
    log:
        f"{RES}/logs/ablation_table.log",
    benchmark:
        f"{RES}/benchmarks/ablation_table.tsv"
    conda:
        "../../envs/evaluate.yaml"
    params:
        out_dir=lambda wildcards, output: Path(output.csv).parent,
        # the paired comparison is against the baseline experiment (`full`, the paper's model)
        cfg=as_json({"baseline": EVAL["baseline"], "bootstrap": EVAL["bootstrap"]}),
    shell:
        "python -m pipeline.evaluate.table --metrics {input.metrics} --scores {input.scores}"
        " --out-dir {params.out_dir} --params-json {params.cfg} > {log} 2>&1"
