rule evaluate:
    input:
        predictions=f"{RES}/experiments/{{exp}}/predictions.parquet",
        references=f"{RES}/reports/test.parquet",
    output:
        f"{RES}/experiments/{{exp}}/metrics.json",
    log:
        f"{RES}/logs/evaluate/{{exp}}.log",
    benchmark:
        f"{RES}/benchmarks/evaluate/{{exp}}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m pipeline.evaluate --predictions {input.predictions} --references {input.references}"
        " --experiment {wildcards.exp} --out {output} > {log} 2>&1"


rule ablation_table:
    input:
        expand(f"{RES}/experiments/{{exp}}/metrics.json", exp=list(config["experiments"])),
    output:
        csv=report(f"{RES}/tables/ablation.csv", caption="../report/ablation.rst", category="Results"),
        md=f"{RES}/tables/ablation.md",
        png=report(f"{RES}/tables/ablation.png", caption="../report/ablation.rst", category="Results"),
    params:
        out_dir=f"{RES}/tables",
    log:
        f"{RES}/logs/ablation_table.log",
    benchmark:
        f"{RES}/benchmarks/ablation_table.tsv"
    conda:
        "../../envs/evaluate.yaml"
    shell:
        "python -m pipeline.evaluate.table --metrics {input} --out-dir {params.out_dir} > {log} 2>&1"
