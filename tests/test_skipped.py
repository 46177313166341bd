"""Skips that carry through (pipeline/skipped.py, model/data.py): the QC tables say which volumes a stage
skipped; training and generation leave exactly those out, and a volume missing from the caches without
such a record is still an error. Unit tests ~5 s (the tiny model: fixture `tiny`, tests/conftest.py)."""

from __future__ import annotations

import json
import shutil
import time

import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import make_model, snakemake

from model.data import ReportDataset
from pipeline.feature_store import FeatureStore
from pipeline.io import InputError
from pipeline.skipped import read_qc, skipped_volumes


def _qc(path, stage, rows):
    pd.DataFrame([{"volume_id": v, "stage": stage, "status": s, "error": e} for v, s, e in rows]).to_parquet(path)
    return path


@pytest.fixture
def qc_tables(tmp_path):
    """Four stages' QC tables: a fails in segment, b in regions, c in features; d and e are fine."""
    return [
        _qc(tmp_path / "segment.parquet", "segment",
            [("a", "error", "a: mask folder not found"), ("b", "ok", ""), ("c", "ok", ""), ("d", "ok", "")]),
        _qc(tmp_path / "regions.parquet", "regions",
            [("a", "skipped", "segment: a: mask folder not found"), ("b", "error", "b: values other than 0 and 1"),
             ("c", "ok", ""), ("d", "ok", "")]),
        _qc(tmp_path / "attributes.parquet", "attributes", [("c", "ok", ""), ("d", "ok", "")]),
        _qc(tmp_path / "features.parquet", "features",
            [("a", "skipped", "no masks"), ("b", "skipped", "no masks"), ("c", "error", "c.nii.gz: NaN voxels"),
             ("d", "ok", "")]),
    ]


def test_skipped_volumes_names_the_failing_stage(qc_tables):
    sk = skipped_volumes(qc_tables)
    assert sk.ids == {"a", "b", "c"} and "d" not in sk and len(sk) == 3
    assert sk.reasons["a"] == ("segment", "a: mask folder not found")
    assert sk.reasons["b"] == ("regions", "b: values other than 0 and 1")  # not the later "skipped" record
    assert sk.reasons["c"] == ("features", "c.nii.gz: NaN voxels")
    assert sk.by_stage() == {"segment": 1, "regions": 1, "attributes": 0, "features": 1}
    block = sk.block(split_ids=["c", "d", "e"])
    assert block["n_volumes"] == 3 and block["volume_ids"] == ["a", "b", "c"]
    assert block["n_test_volumes"] == 1 and block["test_volume_ids"] == ["c"]
    assert block["reasons"]["b"] == "regions: b: values other than 0 and 1"
    # a volume only ever recorded as "skipped" (its failing stage's table not given) is still skipped
    assert skipped_volumes(qc_tables[1:]).reasons["a"] == ("regions", "segment: a: mask folder not found")
    assert len(skipped_volumes([])) == 0


def test_a_bad_qc_table_names_the_file(tmp_path):
    pd.DataFrame({"volume_id": ["a"], "status": ["ok"]}).to_parquet(tmp_path / "q.parquet")
    with pytest.raises(InputError, match=r"q\.parquet: QC table lacks column\(s\) \['stage', 'error'\]"):
        read_qc(tmp_path / "q.parquet")
    with pytest.raises(InputError, match=r"absent\.parquet: QC table not found"):
        read_qc(tmp_path / "absent.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet: cannot read QC table"):
        skipped_volumes([tmp_path / "junk.parquet"])


def _dataset(tiny, reports, model, **kw):
    return ReportDataset(FeatureStore([tiny / "shard-0.zarr"]), reports, pd.read_parquet(tiny / "attributes.parquet"),
                         model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=True, **kw)


def test_dataset_leaves_out_skipped_volumes_only(tiny, tmp_path):
    model = make_model(tiny)
    reports = pd.read_parquet(tiny / "train.parquet")
    ghost = reports.iloc[0].copy()
    ghost["volume_id"] = "ghost_volume"  # in the reports, not in the feature cache
    reports = pd.concat([reports, ghost.to_frame().T], ignore_index=True)
    full = _dataset(tiny, reports.iloc[:-1], model)
    # missing from the cache without a QC record: an error naming it
    with pytest.raises(ValueError, match=r"1 of \d+ report volume\(s\) have no cached features and no QC record "
                                         r"of a skip: ghost_volume"):
        _dataset(tiny, reports, model)
    # recorded as skipped: left out, and listed
    ds = _dataset(tiny, reports, model, skipped={"ghost_volume"})
    assert ds.volume_ids == full.volume_ids and ds.skipped_ids == ["ghost_volume"]
    assert [x.tolist() for x in ds.input_ids] == [x.tolist() for x in full.input_ids]
    # a skipped volume that is in the cache is left out too (e.g. failed in attributes, encoded anyway)
    first = full.volume_ids[0]
    ds = _dataset(tiny, reports, model, skipped={"ghost_volume", first})
    assert ds.volume_ids == full.volume_ids[1:] and ds.skipped_ids == [first, "ghost_volume"]
    # the attribute row: the same rule
    attrs = pd.read_parquet(tiny / "attributes.parquet")
    store = FeatureStore([tiny / "shard-0.zarr"])
    with pytest.raises(ValueError, match=f"no attribute row and no QC record of a skip: {first}"):
        ReportDataset(store, reports.iloc[:-1], attrs[attrs.volume_id != first], model.tokenizer, stage=2,
                      use_mask_tokens=True, use_attributes=True)
    ok = ReportDataset(store, reports.iloc[:-1], attrs[attrs.volume_id != first], model.tokenizer, stage=2,
                       use_mask_tokens=True, use_attributes=True, skipped=[first])
    assert ok.volume_ids == full.volume_ids[1:]


# ---- the workflow: one cohort, two broken volumes, `on_error: skip` then `on_error: fail` ---------------

RUN_CONFIG = """\
results: results
on_error: {on_error}
shard_size: 6
dataset:
  adapter: demo
  demo: {{n_cases: 12, seed: 5}}
regions: {{threads: 1, qc_pictures: 1}}
features: {{threads: 1}}
train:
  stage1: {{epochs: 1, batch_size: 4}}
  stage2: {{epochs: 1, batch_size: 4}}
generate: {{max_new_tokens: 32, batch_size: 8}}
llm: {{demo_pretrain_steps: 10}}
"""


def _run(workdir, *targets, on_error: str):
    (workdir / "config.yaml").write_text(RUN_CONFIG.format(on_error=on_error), encoding="utf-8")
    return snakemake(workdir, *targets, check=False, timeout=1500, configfiles=[workdir / "config.yaml"])


@pytest.mark.slow
def test_workflow_skip_carries_through_and_fail_stops(tmp_path):
    """12 demo volumes (10 trained on, 2 tested); a test volume loses its mask folder (segment fails it) and
    a training volume gets a mask with a 2 (regions fails it). `on_error: skip`: `all` finishes without
    them; `on_error: fail`: the run stops, its log naming the volume and the file. ~2 min on 2 idle
    cores (3.5 min at load 7)."""
    t0 = time.perf_counter()
    workdir = tmp_path / "work"
    workdir.mkdir()
    proc = _run(workdir, "results/cohort.parquet", on_error="skip")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = workdir / "results"
    manifest = pd.read_parquet(res / "cohort.parquet").set_index("volume_id")
    test_ids = sorted(manifest.index[manifest["split"] == "test"])
    train_ids = sorted(manifest.index[manifest["split"] == "train"])
    assert len(test_ids) == 2 and len(train_ids) >= 5
    no_masks, bad_mask = test_ids[1], train_ids[1]
    mask_dir = workdir / manifest.loc[no_masks, "mask_dir"]
    shutil.rmtree(mask_dir)
    lung = workdir / manifest.loc[bad_mask, "mask_dir"] / "left lung upper lobe.nii.gz"
    image = sitk.ReadImage(str(lung))
    arr = sitk.GetArrayFromImage(image)
    arr[arr.shape[0] // 2, 0, 0] = 2
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(lung), useCompression=True)

    proc = _run(workdir, "all", on_error="skip")
    assert proc.returncode == 0, f"`all` did not finish under on_error: skip:\n{proc.stderr[-6000:]}"
    t_skip = time.perf_counter() - t0

    def qc(stage):
        return pd.concat(pd.read_parquet(p) for p in sorted((res / "qc").glob(f"{stage}/shard-*.parquet"))).set_index("volume_id")

    # each stage's QC records them
    assert qc("segment").loc[no_masks, "status"] == "error" and "mask folder not found" in qc("segment").loc[no_masks, "error"]
    assert qc("regions").loc[bad_mask, "status"] == "error" and lung.name in qc("regions").loc[bad_mask, "error"]
    assert qc("regions").loc[no_masks, "status"] == "skipped"
    feats = qc("features/demo-dinov2-r2")
    assert feats.loc[[no_masks, bad_mask], "status"].tolist() == ["skipped", "skipped"]
    assert (feats.drop(index=[no_masks, bad_mask])["status"] == "ok").all()
    # left out of training (and counted there), generation and scoring
    start = json.loads((res / "experiments" / "full" / "stage2" / "train_log.jsonl").read_text().splitlines()[0])
    assert start["train_volumes"] == len(train_ids) - 1 and start["skipped_volumes"] == [bad_mask]
    preds = pd.read_parquet(res / "experiments" / "full" / "predictions.parquet")
    assert preds["volume_id"].tolist() == [test_ids[0]]
    assert {"empty_sections", "duplicated_sections", "repeated_sections", "degenerate"} <= set(preds.columns)
    metrics = json.loads((res / "experiments" / "full" / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["n_volumes"] == 1 and metrics["n_skipped_volumes"] == 2
    sk = metrics["skipped"]
    assert sk["by_stage"] == {"segment": 1, "regions": 1, "attributes": 0, "features": 0}
    assert sk["volume_ids"] == sorted([no_masks, bad_mask]) and sk["test_volume_ids"] == [no_masks]
    assert sk["reasons"][no_masks].startswith("segment: ") and str(mask_dir.relative_to(workdir)) in sk["reasons"][no_masks]
    assert "degenerate" in metrics and (res / "tables" / "ablation.md").is_file()

    # the same cohort under on_error: fail stops at the bad volume, its log naming the volume and the file
    proc = _run(workdir, "all", on_error="fail")
    assert proc.returncode != 0
    failed = sorted({line.split("Error in rule ")[1].split(":")[0] for line in proc.stderr.splitlines()
                     if "Error in rule " in line})
    assert failed and set(failed) <= {"segment", "regions"}, proc.stderr[-3000:]
    logs = " ".join(p.read_text(encoding="utf-8", errors="replace") for rule in failed
                    for p in (res / "logs" / rule).glob("shard-*.log"))
    assert (no_masks in logs and "mask folder not found" in logs and str(mask_dir.relative_to(workdir)) in logs) or (
        bad_mask in logs and lung.name in logs), logs[-3000:]
    print(f"skip run {t_skip:.0f} s, fail run {time.perf_counter() - t0 - t_skip:.0f} s")
