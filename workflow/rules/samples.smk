# Reports to read (pipeline/report_samples.py): per experiment a page of sampled generated reports beside
# their references, and a chart of clinical F1 per class across experiments; both in `snakemake --report`.


rule report_samples:
    input:
        predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
        references=f"{RES}/reports/test.parquet",
        scores=f"{RES}/experiments/{{exp}}/scores.parquet",
    output:
        report(
            f"{RES}/experiments/{{exp}}/samples.html",
            caption="../report/samples.rst",
            category="Results",
            subcategory="Generated reports",
            labels={"experiment": "{exp}"},
        ),
    log:
        f"{RES}/logs/report_samples/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/report_samples/{{exp}}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    params:
        cfg=as_json(config["report_samples"]),
    shell:
        "python -m pipeline.report_samples samples --predictions {input.predictions} --references {input.references}"
        " --scores {input.scores} --experiment {wildcards.exp} --params-json {params.cfg} --out {output} > {log} 2>&1"


rule ca_per_class_chart:
    input:
        expand(
            f"{RES}/experiments/{{exp}}/scores.parquet",
            exp=list(config["experiments"]),
        ),
    output:
        png=report(
            f"{RES}/tables/ca_per_class_chart.png",
            caption="../report/ca_per_class_chart.rst",
            category="Results",
            subcategory="Clinical accuracy per class",
        ),
        csv=f"{RES}/tables/ca_per_class_chart.csv",
    log:
        f"{RES}/logs/ca_per_class_chart.log",
    benchmark:
        f"{RES}/benchmarks/ca_per_class_chart.tsv"
    conda:
        "../../envs/evaluate.yaml"
    params:
        experiments=list(config["experiments"]),
        cfg=as_json(config["evaluate"]["bootstrap"]),  # the evaluate rule's bootstrap
    shell:
        "python -m pipeline.report_samples chart --scores {input} --experiments {params.experiments}"
        " --params-json {params.cfg} --out {output.png} > {log} 2>&1"
