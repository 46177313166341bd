# Masks to open in a viewer (not part of `all`): `snakemake --cores 2 export_masks` writes each volume's
# regions and lesions as NIfTI label maps on its CT's grid, with 3D Slicer and ITK-SNAP colour tables
# (pipeline/export_masks.py).


rule export_masks_shard:
    input:
        masks=f"{RES}/masks/shard-{{shard}}.zarr",
        manifest=f"{RES}/cohort.parquet",
    output:
        directory(f"{RES}/export/masks/shard-{{shard}}"),
    log:
        f"{RES}/logs/export_masks/shard-{{shard}}.log",
    benchmark:
        f"{RES}/benchmarks/export_masks/shard-{{shard}}.tsv"
    wildcard_constraints:
        shard=r"\d+",
    conda:
        "../../envs/pipeline.yaml"
    shell:
        "python -m pipeline.export_masks --masks {input.masks} --manifest {input.manifest} --out {output} > {log} 2>&1"


rule export_masks:
    input:
        shard_files(f"{RES}/export/masks/shard-{{shard}}"),
