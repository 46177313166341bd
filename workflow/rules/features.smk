# Features: the frozen encoder on every slice -> pooled tokens per volume (pipeline/features/).
# Default: `features` encodes and pools in one job per shard and pooling mode. With
# `features.raw_cache: true`, `features` encodes each shard once into a raw-token cache and `pool`
# makes every pooled variant from it (changing pooling / s / grid then re-pools without re-encoding).
import re as _re

FEAT = config["features"]
ENC = FEAT["encoder"]
FEATURE_TAG_DIR = f"{FEATURE_ARRAYS_DIR}/{FEAT['tag']}"
RAW_FEATURES = f"{FEATURE_TAG_DIR}-raw/shard-{{shard}}.zarr"
POOLED_FEATURES = f"{FEATURE_TAG_DIR}-{{pooling}}/shard-{{shard}}.zarr"
FEATURES_QC = f"{RES}/qc/features/{FEAT['tag']}-{{pooling}}/shard-{{shard}}.parquet"  # pooling "raw" with raw_cache
# settings that change the encoding (a change re-encodes); pooling settings only re-pool
ENCODE_KEYS = ("input_size", "hu_window", "channel_windows", "layers", "batch_size", "mask_grid", "mask_threshold", "prefetch",
               "workers", "compressor", "device")
# what `pool` checks against the raw-token cache it reads, and how it writes
POOL_CHECKED = ("input_size", "hu_window", "channel_windows", "layers", "mask_grid", "mask_threshold", "compressor")


def encode_settings():
    return {k: FEAT[k] for k in ENCODE_KEYS}


def pool_settings(pooling):
    # r2 takes one slice per region; `slices` (s) applies to the lita mode
    return {"pooling": pooling, "slices": FEAT["slices"] if pooling == "lita" else None,
            "region_grid": FEAT["region_grid"]}


def encoder_args():
    expect = ENC["expect"] or (
        {"hidden_size": ENC["demo_hidden_size"], "num_hidden_layers": ENC["demo_layers"], "patch_size": 14}
        if ENC["build_demo"] else {}
    )
    args = f"--encoder {shlex.quote(ENC['path'])} --expect-json {as_json(expect)}"
    if ENC.get("revision"):
        args += f" --revision {shlex.quote(ENC['revision'])}"
    return args + (" --allow-download" if ENC["allow_download"] else "")


def encoder_input():
    # a folder (or the demo encoder's output) is an input; a hub id that is no folder here is looked
    # up in the local Hugging Face cache by the job, which says how to get the weights if absent
    path = ENC["path"]
    hub_id = _re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", path) and not Path(path).exists()
    return [] if (hub_id and not ENC["build_demo"]) else [path]


ENCODE_SHELL = (
    "python -m pipeline.features encode --manifest {input.manifest} --shard {wildcards.shard}"
    " --masks {input.masks} {params.encoder} --params-json {params.cfg}"
    " --on-error {params.on_error} --threads {threads}"
)

if not FEAT["raw_cache"]:

    rule features:
        input:
            manifest=f"{RES}/cohort.parquet",
            masks=f"{RES}/masks/shard-{{shard}}.zarr",
            encoder=encoder_input(),
        output:
            directory(POOLED_FEATURES),
            qc=FEATURES_QC,
        wildcard_constraints:
            pooling="r2|lita",
        params:
            cfg=lambda w: as_json({**encode_settings(), **pool_settings(w.pooling)}),
            encoder=encoder_args(),
            on_error=config["on_error"],
        log:
            f"{RES}/logs/features/{{pooling}}-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/features/{{pooling}}-shard-{{shard}}.tsv"
        threads: FEAT["threads"]
        resources:
            gpu=0,
        conda:
            "../../envs/pipeline.yaml"
        shell:
            ENCODE_SHELL + " --out {output[0]} --qc {output.qc} > {log} 2>&1"

else:

    rule features:
        input:
            manifest=f"{RES}/cohort.parquet",
            masks=f"{RES}/masks/shard-{{shard}}.zarr",
            encoder=encoder_input(),
        output:
            directory(RAW_FEATURES),
            qc=FEATURES_QC.replace("{pooling}", "raw"),
        params:
            cfg=as_json(encode_settings()),
            encoder=encoder_args(),
            on_error=config["on_error"],
        log:
            f"{RES}/logs/features/raw-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/features/raw-shard-{{shard}}.tsv"
        threads: FEAT["threads"]
        resources:
            gpu=0,
        conda:
            "../../envs/pipeline.yaml"
        shell:
            ENCODE_SHELL + " --raw-out {output[0]} --qc {output.qc} > {log} 2>&1"

    rule pool:
        input:
            raw=RAW_FEATURES,
        output:
            directory(POOLED_FEATURES),
        wildcard_constraints:
            pooling="r2|lita",
        params:
            cfg=lambda w: as_json({**{k: FEAT[k] for k in POOL_CHECKED}, **pool_settings(w.pooling)}),
        log:
            f"{RES}/logs/pool/{{pooling}}-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/pool/{{pooling}}-shard-{{shard}}.tsv"
        threads: 1
        conda:
            "../../envs/pipeline.yaml"
        shell:
            "python -m pipeline.features pool --raw {input.raw} --params-json {params.cfg} --out {output}"
            " --threads {threads} > {log} 2>&1"
