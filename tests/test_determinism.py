"""Determinism: two runs of the demo workflow (same config and seeds, CPU) give identical results.

The session's `demo_run` (tests/data/e2e_config.yaml: 24 volumes, 3 shards, both training stages)
is one run. The other is the session's run of the same config from nothing through the SLURM profile
(tests/conftest.py `slurm_run`: every job sbatch'ed, one features job killed mid-run and retried) where a
SLURM cluster can start, else a second local run in a fresh folder: the session pays for two runs of
the demo, not three, and where it can the comparison also covers another executor and a retried job.
Compared, for every output of the second run (logs and Snakemake benchmarks excepted, they hold times):

- caches: every Zarr store (masks, features), array by array with its attributes;
- tables: every Parquet file (cohort, segment, QC, attributes, reports, predictions) as frames,
  and the ablation / per-class tables (CSV, Markdown) byte by byte;
- metrics: every metrics.json, as JSON;
- weights: every safetensors file (demo encoder and LLM, trained connector / mask extractor /
  LoRA adapter), tensor by tensor;
- the demo cohort (volumes, masks, CSVs), byte by byte.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from helpers import snakemake

pytestmark = pytest.mark.slow

SKIP_DIRS = {"logs", "benchmarks", ".snakemake"}


def _arrays(group: zarr.Group) -> list[str]:
    with warnings.catch_warnings():  # Snakemake's `.snakemake_timestamp` marker in directory outputs
        warnings.simplefilter("ignore")
        return sorted(group.array_keys())


def _zarr_diff(a: Path, b: Path) -> list[str]:
    out = []
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    if dict(ga.attrs) != dict(gb.attrs):
        keys = sorted(k for k in set(ga.attrs) | set(gb.attrs) if ga.attrs.get(k) != gb.attrs.get(k))
        out.append(f"{b}: group attributes differ: {keys}")
    if _arrays(ga) != _arrays(gb):
        return out + [f"{b}: arrays differ"]
    for name in _arrays(gb):
        x, y = ga[name], gb[name]
        if dict(x.attrs) != dict(y.attrs):
            out.append(f"{b}/{name}: attributes differ")
        if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(np.asarray(x[...]), np.asarray(y[...])):
            out.append(f"{b}/{name}: values differ")
    return out


def _safetensors_diff(a: Path, b: Path) -> list[str]:
    from safetensors.numpy import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if sorted(ta) != sorted(tb):
        return [f"{b}: tensor names differ"]
    return [f"{b}: tensor {k} differs" for k in sorted(tb) if not np.array_equal(ta[k], tb[k])]


def _diff(a: Path, b: Path) -> list[str]:
    """Differences between the outputs of run a and run b (b's files; a must have them all)."""
    out: list[str] = []
    zarrs = sorted(p for p in b.rglob("*.zarr") if p.is_dir())
    for z in zarrs:
        other = a / z.relative_to(b)
        out += _zarr_diff(other, z) if other.is_dir() else [f"{other} missing in the first run"]
    compared = {"zarr": len(zarrs), "parquet": 0, "metrics": 0, "tables": 0, "safetensors": 0, "cohort": 0}
    for f in sorted(p for p in b.rglob("*") if p.is_file()):
        rel = f.relative_to(b)
        if SKIP_DIRS & set(rel.parts) or any(part.endswith(".zarr") for part in rel.parts):
            continue
        other = a / rel
        if not other.is_file():
            out.append(f"{other} missing in the first run")
            continue
        if f.suffix == ".parquet":
            compared["parquet"] += 1
            try:
                pd.testing.assert_frame_equal(pd.read_parquet(other), pd.read_parquet(f))
            except AssertionError as exc:
                out.append(f"{rel}: {str(exc).splitlines()[0]}")
        elif f.name == "metrics.json":
            compared["metrics"] += 1
            if json.loads(other.read_text(encoding="utf-8")) != json.loads(f.read_text(encoding="utf-8")):
                out.append(f"{rel}: metrics differ")
        elif f.suffix == ".safetensors":
            compared["safetensors"] += 1
            out += _safetensors_diff(other, f)
        elif rel.parts[0] == "tables" and f.suffix in (".csv", ".md"):
            compared["tables"] += 1
            if other.read_bytes() != f.read_bytes():
                out.append(f"{rel}: table differs")
        elif rel.parts[:2] == ("demo", "cohort"):
            compared["cohort"] += 1
            if other.read_bytes() != f.read_bytes():
                out.append(f"{rel}: cohort file differs")
    print(f"compared: {compared}")
    assert compared["zarr"] >= 6 and compared["parquet"] >= 10 and compared["metrics"] >= 1
    return out


@pytest.fixture
def second_run(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str]:
    """(working directory, how it ran) of the second run of the demo."""
    try:
        return request.getfixturevalue("slurm_run").workdir, "through SLURM, one features job killed and retried"
    except pytest.skip.Exception:  # no cluster here (the reason is in tests/test_slurm.py's skips)
        pass
    second = tmp_path / "second"
    second.mkdir()
    snakemake(second, "all")
    return second, "locally"


def _jobs_seconds(results: Path) -> float:
    """The jobs' own run time (Snakemake benchmarks): the rest of a run's wall time is scheduling."""
    return sum(float(pd.read_csv(f, sep="\t")["s"].iloc[-1]) for f in (results / "benchmarks").rglob("*.tsv"))


def test_two_demo_runs_give_identical_caches_tables_and_metrics(demo_run: Path, second_run: tuple[Path, str]) -> None:
    second, how = second_run
    differences = _diff(demo_run / "results", second / "results")
    assert not differences, f"the second run ({how}) differs from the first:\n" + "\n".join(differences[:40])
    walls = [(demo_run / "wall_seconds.txt"), (second / "wall_seconds.txt")]
    if all(w.is_file() for w in walls):
        (w1, w2), (j1, j2) = ([float(w.read_text(encoding="utf-8")) for w in walls],
                              [_jobs_seconds(d / "results") for d in (demo_run, second)])
        print(f"\nfirst run (local) {w1:.0f} s, {w1 - j1:.0f} s outside the jobs; second run ({how}) {w2:.0f} s,"
              f" {w2 - j2:.0f} s outside the jobs")
