def launch_flags():
    """`python -m model.launch` flags from config["train"]: accelerate config file, processes, machines.

    Several CPU processes start through torchrun (gloo), everything else through `accelerate launch`
    (model/launch.py). On several machines the rank and head node come from $SLURM_NODEID / $MASTER_ADDR
    at run time.
    """
    t = config["train"]
    flags = ["--accelerate-config", repo_file(t["accelerate_config"])]
    for key, flag in (("processes", "--processes"), ("machines", "--machines"),
                      ("main_process_port", "--main-process-port")):
        if t.get(key) is not None:
            flags += [flag, str(t[key])]
    return " ".join(shlex.quote(f) for f in flags)


def train_gpus():
    """GPUs per machine for the train jobs (a SLURM job's --gpus): 0 on CPU, else processes / machines."""
    from model.launch import gpus_per_machine

    t = config["train"]
    return gpus_per_machine(repo_file(t["accelerate_config"]), t.get("processes"), t.get("machines"))


def train_params(stage):
    def inner(wildcards):
        # train.log_with (a tracker such as tensorboard) applies to both stages; unset, the command is unchanged
        tracker = {"log_with": config["train"]["log_with"]} if config["train"].get("log_with") else {}
        return as_json({**config["train"][f"stage{stage}"], **experiment(wildcards.exp), **tracker})

    return inner


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
        loss=report(f"{RES}/experiments/{{exp}}/stage1/loss.png", caption="../report/loss.rst",
                    category="Training", subcategory="Loss curves", labels={"experiment": "{exp}", "stage": "1"}),
    params:
        cfg=train_params(1),
        launch=launch_flags(),
        out=lambda w: f"{RES}/experiments/{w.exp}/stage1",
    log:
        f"{RES}/logs/train/{{exp}}-stage1.log",
    benchmark:
        f"{RES}/benchmarks/train/{{exp}}-stage1.tsv"
    threads: 2
    resources:
        gpu=train_gpus(),
    conda:
        "../../envs/train.yaml"
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
        loss=report(f"{RES}/experiments/{{exp}}/stage2/loss.png", caption="../report/loss.rst",
                    category="Training", subcategory="Loss curves", labels={"experiment": "{exp}", "stage": "2"}),
    params:
        cfg=train_params(2),
        launch=launch_flags(),
        init=lambda w: f"{RES}/experiments/{w.exp}/stage1",
        out=lambda w: f"{RES}/experiments/{w.exp}/stage2",
    log:
        f"{RES}/logs/train/{{exp}}-stage2.log",
    benchmark:
        f"{RES}/benchmarks/train/{{exp}}-stage2.tsv"
    threads: 2
    resources:
        gpu=train_gpus(),
    conda:
        "../../envs/train.yaml"
    shell:
        "python -m model.launch {params.launch} -- --stage 2"
        " --params-json {params.cfg} --features {input.features} --attributes {input.attributes}"
        " --train-reports {input.train} --val-reports {input.val} --llm {input.llm} --skipped-qc {input.qc}"
        " --init {params.init} --out {params.out} --resume --on-mismatch restart > {log} 2>&1"
