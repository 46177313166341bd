# Shared helpers: paths, shard lists and parameter serialisation. Functions live here only, so the rule
# files hold rules (snakemake --lint). Every setting comes from the schema-validated config, whose
# defaults the schema fills: no default is restated here.
import functools
import json
import re
import shlex
from pathlib import Path

import pandas as pd

from pipeline.config_check import check_placeholders, resolve_demo_model_paths, without

REPO = Path(workflow.basedir)
RES = config["results"]
FEATURE_ARRAYS_DIR = f"{RES}/features"
# a copied template's /path/to/... values fail here, naming the keys
check_placeholders(config)
# build_demo without a path: <results>/demo/models/{encoder,llm}
resolve_demo_model_paths(config, RES)


def repo_file(path):
    """A config path: as given when it exists from the working directory, else inside the repository."""
    p = Path(path)
    return str(p) if p.is_absolute() or p.exists() else str(REPO / p)


def as_json(obj):
    """Parameters travel to the CLIs as one shell-quoted JSON string (and rerun rules when changed)."""
    return shlex.quote(json.dumps(obj, sort_keys=True))


def dataset():
    """The dataset's file locations; the demo's are inside the generated cohort folder."""
    ds = config["dataset"]
    if ds["adapter"] == "demo":
        root = f"{RES}/demo/cohort"
        return {
            "root": root,
            "volumes_dir": f"{root}/volumes",
            "masks_dir": f"{root}/masks",
            "reports_csv": [f"{root}/reports.csv"],
            "region_report_csv": [f"{root}/region_report.csv"],
            "labels_csv": [f"{root}/labels.csv"],
            "splits_csv": f"{root}/splits.csv",
            "validation_fraction": ds["validation_fraction"],
        }
    if ds["adapter"] == "manifest":
        # the cohort rule writes the table's region texts and labels in RadGenome's / CT-RATE's shapes
        return {
            **ds,
            "root": None,
            "region_report_csv": [f"{RES}/cohort/region_report.csv"],
            "labels_csv": [f"{RES}/cohort/labels.csv"],
        }
    return {**ds, "root": None}


@functools.lru_cache(maxsize=1)
def own_volumes():
    """The own-data table's rows, read and checked when the workflow is planned (files are checked by
    the cohort job)."""
    from pipeline.own_data import read_own_manifest

    return read_own_manifest(config["dataset"]["manifest"], check_files=False)


def dataset_inputs():
    ds = dataset()
    if ds["root"] is not None:
        return [ds["root"]]
    if ds["adapter"] == "manifest":
        return [ds["manifest"]]
    return list(ds["reports_csv"]) + ([ds["splits_csv"]] if ds["splits_csv"] else [])


def n_volumes():
    """Volumes in the cohort, known when the DAG is planned (so no checkpoint is needed).

    The demo generates exactly `n_cases` volumes; a real dataset has one per report-CSV row, an
    own-data table one per row. The cohort rule checks that its manifest agrees.
    """
    ds = config["dataset"]
    if ds["adapter"] == "demo":
        return int(ds["demo"]["n_cases"])
    if ds["adapter"] == "manifest":
        return len(own_volumes())
    return sum(len(pd.read_csv(p, usecols=["VolumeName"])) for p in ds["reports_csv"])


N_VOLUMES = n_volumes()
SHARDS = list(range(max(1, -(-N_VOLUMES // config["shard_size"]))))
# own data: the shards holding DICOM rows, converted by dicom_import.smk
DICOM_SHARDS = []
if config["dataset"]["adapter"] == "manifest":
    from pipeline.own_data import dicom_shards

    DICOM_SHARDS = dicom_shards(own_volumes(), config["shard_size"])


def shards(wildcards=None):
    return SHARDS


def shard_files(pattern):
    """Input function: `pattern` formatted for every shard (other wildcards passed through)."""

    def inner(wildcards):
        return [pattern.format(shard=s, **wildcards) for s in shards()]

    return inner


def experiment(name):
    return config["experiments"][name]


def feature_dir(pooling):
    return f"{FEATURE_ARRAYS_DIR}/{config['features']['tag']}-{pooling}"


def experiment_features(wildcards):
    pooling = experiment(wildcards.exp)["pooling"]
    return [f"{feature_dir(pooling)}/shard-{s}.zarr" for s in shards()]


def skip_qc_tables(wildcards):
    """The data stages' QC tables an experiment's steps read (pipeline/skipped.py), in pipeline order: the
    volumes skipped under `on_error: skip` are left out of training, generation and scoring.
    """
    f = config["features"]
    encoded = "raw" if f["raw_cache"] else experiment(wildcards.exp)["pooling"]
    # own data's DICOM import, then the data stages, then the features
    tables = [f"{RES}/qc/dicom/shard-{s}.parquet" for s in DICOM_SHARDS]
    tables += [
        f"{RES}/qc/{stage}/shard-{s}.parquet"
        for stage in ("segment", "regions", "attributes")
        for s in shards()
    ]
    return tables + [
        f"{RES}/qc/features/{f['tag']}-{encoded}/shard-{s}.parquet" for s in shards()
    ]


def all_outputs(wildcards):
    exps = list(config["experiments"])
    return (
        [f"{RES}/experiments/{e}/metrics.json" for e in exps]
        + [f"{RES}/tables/ablation.{ext}" for ext in ("csv", "md", "png")]
        + [f"{RES}/experiments/{e}/samples.html" for e in exps]
        + [f"{RES}/tables/ca_per_class_chart.png"]
        + [f"{RES}/qc/regions/shard-{s}.parquet" for s in shards()]
    )


# ---- features (features.smk) -------------------------------------------------------------------------
# settings that change the encoding (a change re-encodes); pooling settings only re-pool
ENCODE_KEYS = (
    "input_size",
    "hu_window",
    "channel_windows",
    "layers",
    "batch_size",
    "mask_grid",
    "mask_threshold",
    "prefetch",
    "workers",
    "compressor",
    "device",
)
# what `pool` checks against the raw-token cache it reads, and how it writes
POOL_CHECKED = (
    "input_size",
    "hu_window",
    "channel_windows",
    "layers",
    "mask_grid",
    "mask_threshold",
    "compressor",
)


def encode_settings():
    return {k: config["features"][k] for k in ENCODE_KEYS}


def pool_settings(pooling):
    # r2 takes one slice per region; `slices` (s) applies to the lita mode
    f = config["features"]
    return {
        "pooling": pooling,
        "slices": f["slices"] if pooling == "lita" else None,
        "region_grid": f["region_grid"],
    }


def features_params(wildcards):
    """`--params-json` of the features jobs (no raw cache): encoding and pooling settings."""
    return as_json({**encode_settings(), **pool_settings(wildcards.pooling)})


def pool_params(wildcards):
    """`--params-json` of the pool rule: the settings checked against the raw cache, and the pooling."""
    return as_json(
        {
            **{k: config["features"][k] for k in POOL_CHECKED},
            **pool_settings(wildcards.pooling),
        }
    )


def encoder_args():
    enc = config["features"]["encoder"]
    expect = enc["expect"] or (
        {
            "hidden_size": enc["demo_hidden_size"],
            "num_hidden_layers": enc["demo_layers"],
            "patch_size": 14,
        }
        if enc["build_demo"]
        else {}
    )
    args = f"--encoder {shlex.quote(enc['path'])} --expect-json {as_json(expect)}"
    if enc["revision"]:
        args = f"{args} --revision {shlex.quote(enc['revision'])}"
    return f"{args} --allow-download" if enc["allow_download"] else args


def encoder_input():
    # a folder (or the demo encoder's output) is an input; a hub id that is no folder here is looked
    # up in the local Hugging Face cache by the job, which says how to get the weights if absent
    enc = config["features"]["encoder"]
    hub_id = (
        re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", enc["path"])
        and not Path(enc["path"]).exists()
    )
    return [] if (hub_id and not enc["build_demo"]) else [enc["path"]]


# ---- training (train.smk) ----------------------------------------------------------------------------
def launch_flags():
    """`python -m model.launch` flags from config["train"]: accelerate config file, processes, machines.

    Several CPU processes start through torchrun (gloo), everything else through `accelerate launch`
    (model/launch.py). On several machines the rank and head node come from $SLURM_NODEID / $MASTER_ADDR
    at run time.
    """
    t = config["train"]
    flags = ["--accelerate-config", repo_file(t["accelerate_config"])]
    for key, flag in (
        ("processes", "--processes"),
        ("machines", "--machines"),
        ("main_process_port", "--main-process-port"),
    ):
        if t[key] is not None:
            flags += [flag, str(t[key])]
    return " ".join(shlex.quote(f) for f in flags)


def train_gpus():
    """GPUs per machine for the train jobs (a SLURM job's --gpus): 0 on CPU, else processes / machines."""
    from model.launch import gpus_per_machine

    t = config["train"]
    return gpus_per_machine(
        repo_file(t["accelerate_config"]), t["processes"], t["machines"]
    )


def train_params(stage):
    def inner(wildcards):
        # train.log_with (a tracker such as tensorboard) applies to both stages; unset, the command is unchanged
        tracker = (
            {"log_with": config["train"]["log_with"]}
            if config["train"]["log_with"]
            else {}
        )
        return as_json(
            {**config["train"][f"stage{stage}"], **experiment(wildcards.exp), **tracker}
        )

    return inner
