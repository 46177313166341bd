"""The demo workflow on a real one-node SLURM cluster, through `--workflow-profile profiles/slurm`.

Every job is submitted with sbatch by snakemake-executor-plugin-slurm; the outputs must equal those of
the local run of the same workflow (tables exactly, feature arrays to fp16 rounding, the metrics).
Skipped, with the reason, where the cluster cannot run (not root, slurm-wlm/munge not installed).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, snakemake
from slurm_cluster import LocalSlurm, unavailable_reason

from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    pytest.importorskip("snakemake_executor_plugin_slurm")
    # munged runs as the munge user: its folder must be reachable, which pytest's 0700 tmp root is not
    root = Path(tempfile.mkdtemp(prefix="medregion-slurm-"))
    slurm = LocalSlurm(root)
    try:
        slurm.start()
        yield slurm
    finally:
        slurm.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_cluster_schedules_a_gpu_job(cluster: LocalSlurm) -> None:
    """The fixture's cluster is real: sbatch with a GPU request runs and completes."""
    import subprocess

    out = cluster.root / "gpu-job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--gpus=1", "-c", "1", "-o", str(out), "--wrap", "echo ok"],
                          capture_output=True, encoding="utf-8", errors="replace", env=cluster.env, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        states = {j["id"]: j["state"] for j in cluster.jobs()}
        if states.get(job_id) == "COMPLETED":
            break
        time.sleep(0.5)
    assert states.get(job_id) == "COMPLETED", states
    assert out.read_text().strip() == "ok"


# The full demo through the SLURM profile takes minutes and competes for the same 2 cores as the
# local end-to-end run: opt in with MEDREGION_SLURM_E2E=1.
needs_opt_in = pytest.mark.skipif(os.environ.get("MEDREGION_SLURM_E2E") != "1",
                                  reason="set MEDREGION_SLURM_E2E=1 to run the demo workflow through SLURM")


@pytest.fixture(scope="module")
def slurm_run(cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    t0 = time.perf_counter()
    snakemake(workdir, "--workflow-profile", str(REPO / "profiles" / "slurm"), "--jobs", "4", "all",
              env=cluster.env, timeout=2400)
    return workdir, time.perf_counter() - t0


@needs_opt_in
def test_every_job_went_through_sbatch(cluster: LocalSlurm, slurm_run: tuple[Path, float]) -> None:
    workdir, _ = slurm_run
    jobs = cluster.jobs()
    assert jobs, "no job reached the cluster"
    assert all(j["state"] == "COMPLETED" for j in jobs), jobs
    # one SLURM log per submitted job, kept by the profile
    n_logs = len(list((workdir / ".snakemake" / "slurm_logs").rglob("*.log")))
    assert n_logs == len(jobs)
    rules = {p.parent.name.removeprefix("rule_") for p in (workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert {"cohort", "regions", "features", "train_stage2", "generate", "evaluate"} <= rules


@needs_opt_in
def test_slurm_outputs_equal_the_local_run(slurm_run: tuple[Path, float], demo_run: Path) -> None:
    workdir, wall = slurm_run
    local, remote = demo_run / "results", workdir / "results"
    for table in ("cohort.parquet", "reports/train.parquet", "reports/test.parquet",
                  "attributes/shard-0.parquet", "attributes/shard-2.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(local / table), pd.read_parquet(remote / table))
    a = FeatureStore(sorted((local / "features" / "demo-dinov2-r2").glob("shard-*.zarr")))
    b = FeatureStore(sorted((remote / "features" / "demo-dinov2-r2").glob("shard-*.zarr")))
    assert a.volume_ids == b.volume_ids
    for vid in a.volume_ids[:6]:
        for name in FEATURE_ARRAYS:
            np.testing.assert_allclose(a[vid][name].astype(np.float32), b[vid][name].astype(np.float32),
                                       rtol=1e-2, atol=1e-2)
    m_local = json.loads((local / "experiments" / "full" / "metrics.json").read_text())
    m_remote = json.loads((remote / "experiments" / "full" / "metrics.json").read_text())
    for name in ("BLEU-4", "METEOR", "ROUGE-L"):
        assert m_remote["nlg"]["report"][name]["value"] == pytest.approx(m_local["nlg"]["report"][name]["value"],
                                                                         abs=1e-6), name
    local_wall = float((demo_run / "wall_seconds.txt").read_text())
    print(f"\nSLURM run {wall:.0f} s vs local run {local_wall:.0f} s: overhead x{wall / local_wall:.2f}")
