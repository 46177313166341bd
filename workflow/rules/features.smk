# Features: the frozen encoder on every slice -> pooled tokens per volume (pipeline/features/).
# Default: `features` encodes and pools in one job per shard and pooling mode. With
# `features.raw_cache: true`, `features` encodes each shard once into a raw-token cache and `pool`
# makes every pooled variant from it (changing pooling / s / grid then re-pools without re-encoding).
FEAT = config["features"]
FEATURE_TAG_DIR = f"{FEATURE_ARRAYS_DIR}/{FEAT['tag']}"


if not FEAT["raw_cache"]:

    rule features:
        input:
            manifest=f"{RES}/cohort.parquet",
            masks=f"{RES}/masks/shard-{{shard}}.zarr",
            encoder=encoder_input(),
        output:
            features=directory(f"{FEATURE_TAG_DIR}-{{pooling}}/shard-{{shard}}.zarr"),
            qc=f"{RES}/qc/features/{FEAT['tag']}-{{pooling}}/shard-{{shard}}.parquet",
        log:
            f"{RES}/logs/features/{{pooling}}-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/features/{{pooling}}-shard-{{shard}}.tsv"
        wildcard_constraints:
            pooling="r2|lita",
        conda:
            "../../envs/pipeline.yaml"
        threads: FEAT["threads"]
        resources:
            gpu=0,
        params:
            cfg=features_params,
            encoder=encoder_args(),
            on_error=config["on_error"],
        shell:
            "python -m pipeline.features encode --manifest {input.manifest} --shard {wildcards.shard}"
            " --masks {input.masks} {params.encoder} --params-json {params.cfg}"
            " --on-error {params.on_error} --threads {threads} --out {output.features} --qc {output.qc} > {log} 2>&1"

else:

    rule features:
        input:
            manifest=f"{RES}/cohort.parquet",
            masks=f"{RES}/masks/shard-{{shard}}.zarr",
            encoder=encoder_input(),
        output:
            raw=directory(f"{FEATURE_TAG_DIR}-raw/shard-{{shard}}.zarr"),
            qc=f"{RES}/qc/features/{FEAT['tag']}-raw/shard-{{shard}}.parquet",
        log:
            f"{RES}/logs/features/raw-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/features/raw-shard-{{shard}}.tsv"
        conda:
            "../../envs/pipeline.yaml"
        threads: FEAT["threads"]
        resources:
            gpu=0,
        params:
            cfg=as_json(encode_settings()),
            encoder=encoder_args(),
            on_error=config["on_error"],
        shell:
            "python -m pipeline.features encode --manifest {input.manifest} --shard {wildcards.shard}"
            " --masks {input.masks} {params.encoder} --params-json {params.cfg}"
            " --on-error {params.on_error} --threads {threads} --raw-out {output.raw} --qc {output.qc} > {log} 2>&1"

    rule pool:
        input:
            raw=f"{FEATURE_TAG_DIR}-raw/shard-{{shard}}.zarr",
        output:
            directory(f"{FEATURE_TAG_DIR}-{{pooling}}/shard-{{shard}}.zarr"),
        log:
            f"{RES}/logs/pool/{{pooling}}-shard-{{shard}}.log",
        benchmark:
            f"{RES}/benchmarks/pool/{{pooling}}-shard-{{shard}}.tsv"
        wildcard_constraints:
            pooling="r2|lita",
        conda:
            "../../envs/pipeline.yaml"
        threads: 1
        params:
            cfg=pool_params,
        shell:
            "python -m pipeline.features pool --raw {input.raw} --params-json {params.cfg} --out {output}"
            " --threads {threads} > {log} 2>&1"
