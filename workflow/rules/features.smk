def feature_params(wildcards):
    f = config["features"]
    keys = ("input_size", "hu_window", "layers", "batch_size", "region_grid", "mask_grid", "mask_threshold")
    return as_json({**{k: f[k] for k in keys}, "pooling": wildcards.pooling})


rule features:
    input:
        manifest=f"{RES}/cohort.parquet",
        masks=f"{RES}/masks/shard-{{shard}}.zarr",
        encoder=config["features"]["encoder"]["path"],
    output:
        directory(f"{FEATURE_ARRAYS_DIR}/{config['features']['tag']}-{{pooling}}/shard-{{shard}}.zarr"),
    wildcard_constraints:
        pooling="r2|lita",
    params:
        cfg=feature_params,
        revision=f"--revision {config['features']['encoder']['revision']}"
        if config["features"]["encoder"].get("revision")
        else "",
        on_error=config["on_error"],
    log:
        f"{RES}/logs/features/{{pooling}}-shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/features/{{pooling}}-shard-{{shard}}.tsv"
    threads: config["features"]["threads"]
    resources:
        gpu=0,
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.features encode --manifest {input.manifest} --shard {wildcards.shard}"
        " --masks {input.masks} --encoder {input.encoder} {params.revision} --params-json {params.cfg}"
        " --out {output} --on-error {params.on_error} --threads {threads} > {log} 2>&1"
