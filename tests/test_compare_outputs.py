"""benchmarks/compare_demo_outputs.py, the check that a restructuring changed no output: it must see a
changed value in each kind of output it compares, and ignore what runs legitimately differ in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "compare_demo_outputs.py"


def write_results(root: Path, *, value: float = 1.0, cell: str = "a", score: float = 0.5, seconds: float = 1.0,
                  log: str = "run 1", loss: float = 2.5) -> None:
    (root / "logs").mkdir(parents=True)
    (root / "logs" / "x.log").write_text(log, encoding="utf-8")
    pd.DataFrame({"volume_id": ["v1", "v2"], "text": [cell, "b"], "seconds": [seconds, 2.0]}).to_parquet(
        root / "table.parquet", index=False)
    group = zarr.open_group(str(root / "f.zarr"), mode="w", zarr_format=3)
    group.attrs.update({"complete": True, "volume_ids": ["v1", "v2"]})
    group.create_array("packed", data=np.array([[value, 2.0]], dtype=np.float32))
    (root / "metrics.json").write_text(json.dumps({"bleu": score, "elapsed_s": seconds}), encoding="utf-8")
    (root / "report.txt").write_text("findings", encoding="utf-8")
    records = [{"step": 1, "loss": loss, "elapsed_s": seconds, "ranks": [{"pid": int(seconds), "host": "a"}]}]
    (root / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def run(old: Path, new: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(old), str(new)], capture_output=True, encoding="utf-8")


def test_same_outputs_are_equal_despite_logs_and_timings(tmp_path):
    write_results(tmp_path / "old")
    write_results(tmp_path / "new", seconds=9.0, log="run 2")
    proc = run(tmp_path / "old", tmp_path / "new")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DIFF" not in proc.stdout
    assert proc.stdout.splitlines()[-2].split() == ["all", "5", "0"]


def test_each_kind_of_change_is_found(tmp_path):
    write_results(tmp_path / "old")
    cases = {"zarr": {"value": 1.5}, "parquet": {"cell": "c"}, "json": {"score": 0.25}, "jsonl": {"loss": 2.0}}
    for name, change in cases.items():
        write_results(tmp_path / name, **change)
        proc = run(tmp_path / "old", tmp_path / name)
        assert proc.returncode == 1, name
        diffs = [line for line in proc.stdout.splitlines() if line.startswith("DIFF")]
        assert len(diffs) == 1 and {"zarr": "f.zarr", "parquet": "table.parquet", "json": "metrics.json",
                                      "jsonl": "train_log.jsonl"}[name] in diffs[0]
    (tmp_path / "parquet" / "extra.txt").write_text("x", encoding="utf-8")
    assert "extra.txt: only in new" in run(tmp_path / "old", tmp_path / "parquet").stdout
