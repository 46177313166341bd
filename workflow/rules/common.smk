# Shared helpers: paths, shard lists and parameter serialisation. Input functions live here only.
import functools
import json
import shlex
from pathlib import Path

import pandas as pd

from pipeline.config_check import check_placeholders, resolve_demo_model_paths

REPO = Path(workflow.basedir)
RES = config["results"]
FEATURE_ARRAYS_DIR = f"{RES}/features"
check_placeholders(config)  # a copied template's /path/to/... values fail here, naming the keys
resolve_demo_model_paths(config, RES)  # build_demo without a path: <results>/demo/models/{encoder,llm}


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
            "validation_fraction": 0.15,
        }
    if ds["adapter"] == "manifest":
        # the cohort rule writes the table's region texts and labels in RadGenome's / CT-RATE's shapes
        return {**ds, "root": None, "region_report_csv": [f"{RES}/cohort/region_report.csv"],
                "labels_csv": [f"{RES}/cohort/labels.csv"]}
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
    return list(ds["reports_csv"]) + ([ds["splits_csv"]] if ds.get("splits_csv") else [])


def n_volumes():
    """Volumes in the cohort, known when the DAG is planned (so no checkpoint is needed).

    The demo generates exactly `n_cases` volumes; a real dataset has one per report-CSV row, an
    own-data table one per row. The cohort rule checks that its manifest agrees.
    """
    ds = config["dataset"]
    if ds["adapter"] == "demo":
        return int(ds.get("demo", {}).get("n_cases", 80))
    if ds["adapter"] == "manifest":
        return len(own_volumes())
    return sum(len(pd.read_csv(p, usecols=["VolumeName"])) for p in ds["reports_csv"])


def demo_findings_args(demo):
    """The demo generator's `--findings` / `--normal-fraction` options from `dataset.demo`, shell-quoted."""
    args = []
    if demo.get("findings") is not None:
        items = demo["findings"].items() if isinstance(demo["findings"], dict) else [(k, None) for k in demo["findings"]]
        args += ["--findings"] + [shlex.quote(k if w is None else f"{k}={w}") for k, w in items]
    if demo.get("normal_fraction") is not None:
        args += ["--normal-fraction", str(float(demo["normal_fraction"]))]
    return " ".join(args)


N_VOLUMES = n_volumes()
SHARDS = list(range(max(1, -(-N_VOLUMES // config["shard_size"]))))


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
    volumes skipped under `on_error: skip` are left out of training, generation and scoring."""
    f = config["features"]
    encoded = "raw" if f["raw_cache"] else experiment(wildcards.exp)["pooling"]
    tables = [f"{RES}/qc/dicom/shard-{s}.parquet" for s in globals().get("DICOM_SHARDS", [])]  # own data's DICOM
    tables += [f"{RES}/qc/{stage}/shard-{s}.parquet" for stage in ("segment", "regions", "attributes") for s in shards()]
    return tables + [f"{RES}/qc/features/{f['tag']}-{encoded}/shard-{s}.parquet" for s in shards()]


def all_outputs(wildcards):
    exps = list(config["experiments"])
    return (
        [f"{RES}/experiments/{e}/metrics.json" for e in exps]
        + [f"{RES}/tables/ablation.{ext}" for ext in ("csv", "md", "png")]
        + [f"{RES}/experiments/{e}/samples.html" for e in exps] + [f"{RES}/tables/ca_per_class_chart.png"]
        + [f"{RES}/qc/regions/shard-{s}.parquet" for s in shards()]
    )
