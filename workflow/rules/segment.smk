# Segment stage: per-structure masks for every volume of a shard (pipeline/segment.py).
# Backends: precomputed (validate shipped SAT masks), sat (sat_input -> sat_inference in SAT's own
# env -> segment maps SAT's output back onto each CT grid), totalsegmentator (run per CT).
SEG = config["segmentation"]
SEG_BACKEND = SEG["backend"]
SEG_MASKS = f"{RES}/segment/masks/shard-{{shard}}"
SEG_SAT_RAW = f"{RES}/segment/sat/shard-{{shard}}"
# the segment jobs' settings: the section with only the chosen backend's parameters (another backend's
# change does not rerun them)
SEG_SETTINGS = without(SEG, "sat", "totalsegmentator") | {
    k: SEG[k] for k in ("sat", "totalsegmentator") if k == SEG_BACKEND
}

if SEG_BACKEND == "sat":

    rule sat_input:
        input:
            manifest=f"{RES}/cohort.parquet",
            table=repo_file(config["regions_table"]),
        output:
            f"{RES}/segment/sat/shard-{{shard}}.jsonl",
        log:
            f"{RES}/logs/sat_input/shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/sat_input/shard-{{shard}}.tsv"
        wildcard_constraints:
            shard=r"\d+",
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m pipeline.segment --step prepare --manifest {input.manifest}"
            " --shard {wildcards.shard} --table {input.table} --out {output} > {log} 2>&1"

    rule sat_inference:
        input:
            f"{RES}/segment/sat/shard-{{shard}}.jsonl",
        output:
            directory(SEG_SAT_RAW),
        log:
            f"{RES}/logs/sat_inference/shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/sat_inference/shard-{{shard}}.tsv"
        wildcard_constraints:
            shard=r"\d+",
        conda:
            "../../envs/sat.yaml"
        threads: 4
        resources:
            gpu=SEG["sat"]["gpus"],
            mem_mb=48000,
        params:
            checkout=SEG["sat"]["checkout"],
            checkpoint=SEG["sat"]["checkpoint"],
            text_encoder_checkpoint=SEG["sat"]["text_encoder_checkpoint"],
            backbone=SEG["sat"]["vision_backbone"],
            text_encoder=SEG["sat"]["text_encoder"],
            max_queries=SEG["sat"]["max_queries"],
            batch=SEG["sat"]["batchsize_3d"],
            launcher=SEG["sat"]["launcher"],
        shell:
            "out=$(realpath -m {output}); jsonl=$(realpath {input}); log=$(realpath -m {log}); cd {params.checkout} &&"
            " PYTHONPATH={params.checkout}:{params.checkout}/model/dynamic-network-architectures-main${{PYTHONPATH:+:$PYTHONPATH}}"
            " {params.launcher} inference.py --rcd_dir $out --datasets_jsonl $jsonl"
            " --vision_backbone {params.backbone} --checkpoint {params.checkpoint} --text_encoder {params.text_encoder}"
            " --text_encoder_checkpoint {params.text_encoder_checkpoint} --max_queries {params.max_queries}"
            " --batchsize_3d {params.batch} > $log 2>&1"


rule segment:
    input:
        manifest=f"{RES}/cohort.parquet",
        table=repo_file(config["regions_table"]),
        sat=[SEG_SAT_RAW] if SEG_BACKEND == "sat" else [],
    output:
        table=f"{RES}/segment/shard-{{shard}}.parquet",
        qc=f"{RES}/qc/segment/shard-{{shard}}.parquet",
        masks=[directory(SEG_MASKS)] if SEG_BACKEND != "precomputed" else [],
    log:
        f"{RES}/logs/segment/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/segment/shard-{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/pipeline.yaml"
    params:
        cfg=as_json(SEG_SETTINGS),
        on_error=config["on_error"],
        masks=f"--masks-out {SEG_MASKS}" if SEG_BACKEND != "precomputed" else "",
    shell:
        "python -m pipeline.segment --manifest {input.manifest} --shard {wildcards.shard} --table {input.table}"
        " --params-json {params.cfg} --sat-raw {input.sat} {params.masks} --on-error {params.on_error}"
        " --out {output.table} --qc {output.qc} > {log} 2>&1"
