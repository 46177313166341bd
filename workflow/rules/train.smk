# Training (model/train.py through model/launch.py): stage 1 (connector) then stage 2 (LoRA) per
# experiment; settings: config train.stage1 / train.stage2 and the experiment's switches.
TRAIN_INPUTS = dict(
    features=experiment_features,
    attributes=shard_files(f"{RES}/attributes/shard-{{shard}}.parquet"),
    train=f"{RES}/reports/train.parquet",
    val=f"{RES}/reports/validation.parquet",
    llm=config["llm"]["path"],
    qc=skip_qc_tables,  # volumes skipped under on_error: skip are left out
)


rule train_stage1:
    input:
        **TRAIN_INPUTS,
    output:
        f"{RES}/experiments/{{exp}}/stage1/medregion_config.json",
        loss=report(
            f"{RES}/experiments/{{exp}}/stage1/loss.png",
            caption="../report/loss.rst",
            category="Training",
            subcategory="Loss curves",
            labels={"experiment": "{exp}", "stage": "1"},
        ),
    log:
        f"{RES}/logs/train/{{exp}}-stage1.log",
    benchmark:
        f"{RES}/benchmarks/train/{{exp}}-stage1.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=train_gpus(),
    params:
        cfg=train_params(1),
        launch=launch_flags(),
        out=lambda w: f"{RES}/experiments/{w.exp}/stage1",
    shell:
        "python -m model.launch {params.launch} -- --stage 1"
        " --params-json {params.cfg} --features {input.features} --attributes {input.attributes}"
        " --train-reports {input.train} --val-reports {input.val} --llm {input.llm} --skipped-qc {input.qc}"
        " --out {params.out} --resume --on-mismatch restart > {log} 2>&1"


rule train_stage2:
    input:
        **TRAIN_INPUTS,
        stage1=f"{RES}/experiments/{{exp}}/stage1/medregion_config.json",
    output:
        f"{RES}/experiments/{{exp}}/stage2/medregion_config.json",
        loss=report(
            f"{RES}/experiments/{{exp}}/stage2/loss.png",
            caption="../report/loss.rst",
            category="Training",
            subcategory="Loss curves",
            labels={"experiment": "{exp}", "stage": "2"},
        ),
    log:
        f"{RES}/logs/train/{{exp}}-stage2.log",
    benchmark:
        f"{RES}/benchmarks/train/{{exp}}-stage2.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        gpu=train_gpus(),
    params:
        cfg=train_params(2),
        launch=launch_flags(),
        init=lambda w: f"{RES}/experiments/{w.exp}/stage1",
        out=lambda w: f"{RES}/experiments/{w.exp}/stage2",
    shell:
        "python -m model.launch {params.launch} -- --stage 2"
        " --params-json {params.cfg} --features {input.features} --attributes {input.attributes}"
        " --train-reports {input.train} --val-reports {input.val} --llm {input.llm} --skipped-qc {input.qc}"
        " --init {params.init} --out {params.out} --resume --on-mismatch restart > {log} 2>&1"
