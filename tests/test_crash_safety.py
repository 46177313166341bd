"""Crash safety of the data stages: a job killed with SIGKILL, then rerun, ends as if never killed.

For each data stage (segment, regions, attributes, features) the stage's CLI (what its rule runs)
is run once uninterrupted on a small demo shard: the reference. Then, at seeded random points, the
same job is started, killed with SIGKILL (its whole process group: a node failure or the OOM
killer does not let a job clean up), and rerun to completion. After every rerun:

- the stage's outputs equal the reference (Parquet tables as frames, Zarr arrays value by value
  with their attributes, QC pictures byte by byte);
- no temporary file or folder (`*.tmp*`) is left anywhere in the results folder;
- right after the kill, every output that exists is a complete one (equal to the reference):
  outputs are written under temporary names and renamed when complete.

Kill points per stage (seed = the stage's index): three random delays from the start, one in each
third of T (the reference run's duration: imports, reading and computing, writing), and two while
the job writes its outputs (random delays in the two halves of the first 80 % of the reference's
write phase, counted from the moment its first temporary output appears). The points tried,
whether each kill came while the job still ran, and the temporaries it left are printed and written
to `<basetemp>/crash_points.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from helpers import REPO

N_CASES = 6
ENCODER = {"hidden_size": 32, "num_hidden_layers": 2, "patch_size": 14}
FEATURES = {"layers": [1, 2], "workers": 0, "device": "cpu", "batch_size": 16}
STAGES = ("segment", "regions", "attributes", "features")
RECORD: dict[str, list[dict]] = {}


def _outputs(stage: str) -> list[str]:
    """The stage's outputs, relative to the results folder."""
    return {
        "segment": ["segment/shard-0.parquet", "qc/segment/shard-0.parquet"],
        "regions": ["masks/shard-0.zarr", "qc/regions/shard-0.parquet", "qc/regions/shard-0"],
        "attributes": ["attributes/shard-0.parquet", "qc/attributes/shard-0.parquet"],
        "features": ["features/demo-r2/shard-0.zarr"],
    }[stage]


def _command(stage: str, data: Path, res: Path) -> list[str]:
    m = str(data / "cohort.parquet")
    py = [sys.executable, "-m"]
    if stage == "segment":
        return [*py, "pipeline.segment", "--manifest", m, "--shard", "0", "--out", str(res / "segment/shard-0.parquet"),
                "--qc", str(res / "qc/segment/shard-0.parquet")]
    if stage == "regions":
        return [*py, "pipeline.regions", "--manifest", m, "--shard", "0", "--segment", str(res / "segment/shard-0.parquet"),
                "--table", str(REPO / "config" / "regions.yaml"), "--out", str(res / "masks/shard-0.zarr"),
                "--qc", str(res / "qc/regions/shard-0.parquet"), "--pictures", str(res / "qc/regions/shard-0"),
                "--params-json", '{"qc_pictures": 1}', "--threads", "1"]
    if stage == "attributes":
        return [*py, "pipeline.attributes", "--masks", str(res / "masks/shard-0.zarr"),
                "--out", str(res / "attributes/shard-0.parquet"), "--qc", str(res / "qc/attributes/shard-0.parquet")]
    return [*py, "pipeline.features", "encode", "--manifest", m, "--shard", "0", "--masks", str(res / "masks/shard-0.zarr"),
            "--encoder", str(data / "encoder"), "--expect-json", json.dumps(ENCODER), "--params-json",
            json.dumps(FEATURES), "--out", str(res / "features/demo-r2/shard-0.zarr"), "--threads", "1"]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _start(stage: str, data: Path, res: Path) -> subprocess.Popen[bytes]:
    log = open(res.parent / f"{stage}.log", "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(_command(stage, data, res), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _temporaries(res: Path) -> list[Path]:
    return [p for p in res.rglob("*") if ".tmp" in p.name]


def _run(stage: str, data: Path, res: Path) -> None:
    proc = _start(stage, data, res)
    if proc.wait(timeout=300) != 0:
        raise AssertionError(f"{stage} failed:\n" + (res.parent / f"{stage}.log").read_text(encoding="utf-8",
                                                                                              errors="replace")[-3000:])


# ---- comparing outputs ----------------------------------------------------------------------------


def _same_zarr(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    assert dict(ga.attrs) == dict(gb.attrs), f"{b}: group attributes differ"
    names = sorted(ga.array_keys())
    assert names == sorted(gb.array_keys()), f"{b}: arrays differ"
    for name in names:
        x, y = ga[name], gb[name]
        assert dict(x.attrs) == dict(y.attrs), f"{b}/{name}: attributes differ"
        assert x.shape == y.shape and x.dtype == y.dtype, f"{b}/{name}: shape or dtype differ"
        np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=f"{b}/{name}")


def _same(ref: Path, out: Path) -> None:
    assert out.exists(), f"{out} missing"
    if out.name.endswith(".parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(ref), pd.read_parquet(out))
    elif out.name.endswith(".zarr"):
        _same_zarr(ref, out)
    else:  # the QC pictures folder
        names = sorted(p.name for p in ref.iterdir())
        assert names == sorted(p.name for p in out.iterdir()), f"{out}: files differ"
        for n in names:
            assert (ref / n).read_bytes() == (out / n).read_bytes(), f"{out / n} differs"


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A demo shard, every stage run once uninterrupted (the reference), with the timings."""
    from pipeline import cohort
    from pipeline.demo_cohort import generate_demo_cohort
    from pipeline.features.encoder import build_demo_encoder

    data = tmp_path_factory.mktemp("crash")
    generate_demo_cohort(data / "cohort", n_cases=N_CASES, seed=11, workers=1)
    manifest = cohort.build_radgenome_manifest(data / "cohort" / "volumes", data / "cohort" / "masks",
                                               [data / "cohort" / "reports.csv"], N_CASES,
                                               data / "cohort" / "splits.csv")
    manifest.to_parquet(data / "cohort.parquet")
    build_demo_encoder(data / "encoder", ENCODER["hidden_size"], ENCODER["num_hidden_layers"], 2)
    res = data / "results"
    timing: dict[str, tuple[float, float]] = {}
    for stage in STAGES:
        t0 = time.perf_counter()
        proc = _start(stage, data, res)
        first_tmp = None
        while proc.poll() is None:
            if first_tmp is None and _temporaries(res):
                first_tmp = time.perf_counter() - t0
            time.sleep(0.01)
        assert proc.returncode == 0, (data / f"{stage}.log").read_text(encoding="utf-8", errors="replace")[-3000:]
        total = time.perf_counter() - t0
        timing[stage] = (total, first_tmp if first_tmp is not None else total * 0.5)
    ref = data / "reference"
    shutil.copytree(res, ref)
    assert not _temporaries(res)
    yield {"data": data, "res": res, "ref": ref, "timing": timing}
    record = data.parent / "crash_points.json"
    record.write_text(json.dumps({"timing_s": timing, "points": RECORD}, indent=2), encoding="utf-8")
    print(f"\ncrash points tried: {json.dumps({s: len(p) for s, p in RECORD.items()})} (details: {record})")


def _kill_points(stage: str, total: float, first_tmp: float) -> list[tuple[str, float]]:
    """Three delays from the start, one in each third of the job's duration; two while it writes, one in
    each half of the first 80 % of the reference's write phase."""
    rng = np.random.default_rng(STAGES.index(stage))
    points = [("start", float(total * (k + rng.uniform(0.05, 0.95)) / 3)) for k in range(3)]
    write = 0.8 * max(total - first_tmp, 0.05)
    points += [("writing", float(write * (k + rng.uniform(0.0, 1.0)) / 2)) for k in range(2)]
    return points


@pytest.mark.parametrize("stage", STAGES)
def test_killed_stage_reruns_to_the_same_outputs(shard, stage: str) -> None:
    data, res, ref = Path(shard["data"]), Path(shard["res"]), Path(shard["ref"])
    total, first_tmp = shard["timing"][stage]
    tried = RECORD.setdefault(stage, [])
    for trigger, delay in _kill_points(stage, total, first_tmp):
        for rel in _outputs(stage):
            p = res / rel
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        proc = _start(stage, data, res)
        t0 = time.perf_counter()
        if trigger == "writing":  # from the moment the job's first temporary output appears
            while proc.poll() is None and not _temporaries(res) and time.perf_counter() - t0 < 120:
                time.sleep(0.005)
            t0 = time.perf_counter()
        while proc.poll() is None and time.perf_counter() - t0 < delay:
            time.sleep(0.005)
        running = proc.poll() is None
        left = [p.name for p in _temporaries(res)]
        if running:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        done = [rel for rel in _outputs(stage) if (res / rel).exists()]
        tried.append({"trigger": trigger, "delay_s": round(delay, 3), "killed": running,
                      "temporaries_at_kill": left, "outputs_present_after_kill": done})
        for rel in done:  # whatever exists after the kill is complete
            _same(ref / rel, res / rel)
        _run(stage, data, res)  # the rerun
        for rel in _outputs(stage):
            _same(ref / rel, res / rel)
        assert not _temporaries(res), f"{stage}: temporary files left after the rerun: {_temporaries(res)}"
    assert len(tried) >= 5
    assert any(t["killed"] for t in tried), f"{stage}: every kill came after the job ended: {tried}"
