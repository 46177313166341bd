"""Skips that carry through (pipeline/skipped.py, model/data.py): the QC tables say which volumes a stage
skipped; training and generation leave exactly those out, and a volume missing from the caches without
such a record is still an error. Unit tests ~5 s (the tiny model of test_model.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from test_model import make_model, tiny  # noqa: F401  (fixture)

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


def _dataset(tiny, reports, model, **kw):  # noqa: F811
    return ReportDataset(FeatureStore([tiny / "shard-0.zarr"]), reports, pd.read_parquet(tiny / "attributes.parquet"),
                         model.tokenizer, stage=2, use_mask_tokens=True, use_attributes=True, **kw)


def test_dataset_leaves_out_skipped_volumes_only(tiny, tmp_path):  # noqa: F811
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
