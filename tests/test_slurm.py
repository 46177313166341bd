"""The workflow on a real one-node SLURM cluster, through `--workflow-profile profiles/slurm`.

Where the cluster can run: a GPU job; the whole demo from nothing through the profile, every job
submitted with sbatch, one `features` job killed with `scancel` mid-run and retried by Snakemake
(`retries` in the profile), outputs equal to the local run's (tables, predictions, features, metrics);
`train_stage1` with `train.processes: 2`, two gloo ranks inside one SLURM job. Skipped, with the
reason, where the cluster cannot run (not root, slurm-wlm/munge not installed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import E2E_CONFIG, REPO, snakemake
from slurm_cluster import LocalSlurm, unavailable_reason

from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore

pytestmark = pytest.mark.slow
PROFILE = REPO / "profiles" / "slurm"
# every rule of the demo's DAG but `all` (a localrule that only gathers files)
REMOTE_RULES = {"demo_cohort", "demo_encoder", "demo_llm", "cohort", "reports", "segment", "regions",
                "attributes", "features", "train_stage1", "train_stage2", "generate", "evaluate",
                "ablation_table"}
GPU_RULES = {"features", "generate"}
# the job killed mid-run (the plugin puts `rule_<name>_wildcards_<values>` into the job comment)
KILLED = "rule_features_wildcards_r2_0"


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


def wait_for(cluster: LocalSlurm, job_id: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = {j["id"]: j["state"] for j in cluster.jobs()}.get(job_id, "")
        if state in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}:
            break
        time.sleep(0.5)
    return state


def test_cluster_schedules_a_gpu_job(cluster: LocalSlurm) -> None:
    """The fixture's cluster is real: sbatch with a GPU request runs and completes."""
    out = cluster.root / "gpu-job.out"
    proc = subprocess.run(["sbatch", "--parsable", "--gpus=1", "-c", "1", "-o", str(out), "--wrap", "echo ok"],
                          capture_output=True, encoding="utf-8", errors="replace", env=cluster.env, check=True)
    job_id = proc.stdout.strip().split(";")[0]
    assert wait_for(cluster, job_id) == "COMPLETED"
    assert out.read_text(encoding="utf-8").strip() == "ok"
    assert "gpu:1" in cluster.job_info(job_id).get("TresPerJob", "")


class Watch(threading.Thread):
    """Polls the cluster during a run: records every job it sees and its `scontrol` record (slurmctld
    forgets finished jobs after MinJobAge) and `scancel`s the job whose comment is `kill` once,
    `after_s` seconds after its rule's command started (its log file `started` appeared): killed
    mid-run, not while queued."""

    def __init__(self, cluster: LocalSlurm, kill: str, started: Path, after_s: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.cluster, self.kill, self.started, self.after_s = cluster, kill, started, after_s
        self.done = threading.Event()
        self.seen: dict[str, dict[str, str]] = {}
        self.info: dict[str, dict[str, str]] = {}
        self.killed: dict[str, str] | None = None

    def run(self) -> None:
        started_at = None
        while not self.done.is_set():
            for job in self.cluster.jobs():
                self.seen[job["id"]] = job
                if job["id"] not in self.info:
                    self.info[job["id"]] = self.cluster.job_info(job["id"])
                if self.killed or job["comment"] != self.kill or job["state"] != "RUNNING":
                    continue
                if started_at is None and self.started.exists():
                    started_at = time.monotonic()
                if started_at is not None and time.monotonic() - started_at >= self.after_s:
                    self.cluster.cancel(job["id"])
                    self.killed = job
            self.done.wait(0.5)


@dataclass
class SlurmRun:
    workdir: Path
    wall: float
    log: str  # Snakemake's output
    jobs: list[dict[str, str]] = field(default_factory=list)  # the cluster's jobs of this run
    info: dict[str, dict[str, str]] = field(default_factory=dict)  # job id -> `scontrol show job`
    killed: dict[str, str] | None = None


def run_through_slurm(cluster: LocalSlurm, workdir: Path, *args: str, kill: str | None = None,
                      started: Path | None = None) -> SlurmRun:
    """Snakemake with the SLURM profile in `workdir`; with `kill`, that job is scancel'ed once mid-run."""
    before = {j["id"] for j in cluster.jobs()}
    watch = Watch(cluster, kill or "", started or workdir / "never")
    watch.start()
    t0 = time.perf_counter()
    try:
        proc = snakemake(workdir, "--workflow-profile", str(PROFILE), "--jobs", "4", *args,
                         env=cluster.env, timeout=2400)
    finally:
        watch.done.set()
        watch.join()
    wall = time.perf_counter() - t0
    jobs = {**watch.seen, **{j["id"]: j for j in cluster.jobs()}}
    jobs = [jobs[i] for i in sorted(jobs, key=int) if i not in before]
    return SlurmRun(workdir, wall, proc.stdout + proc.stderr, jobs, watch.info, watch.killed)


def copy_of(demo_run: Path, dest: Path) -> Path:
    """A finished local demo run to continue through SLURM (modification times and metadata kept)."""
    shutil.copytree(demo_run, dest, symlinks=True)
    return dest


def assert_killed_once_and_retried(run: SlurmRun, comment: str) -> None:
    assert run.killed is not None, f"{comment} was never seen running"
    states = [j["state"] for j in run.jobs if j["comment"] == comment]
    assert states == ["CANCELLED", "COMPLETED"], states  # killed once, resubmitted once
    assert [j["state"] for j in run.jobs].count("CANCELLED") == 1
    assert f"SLURM-job '{run.killed['id']}' failed, SLURM status is: 'CANCELLED'" in run.log
    assert "Trying to restart job" in run.log
    # the killed attempt was running the rule (the watch killed it after the rule's log appeared)
    killed_log = next((run.workdir / ".snakemake" / "slurm_logs").rglob(f"{run.killed['id']}.log"))
    assert f"rule {rule_of(comment)}:" in killed_log.read_text(encoding="utf-8", errors="replace")


def assert_same_features(a_dir: Path, b_dir: Path, n: int = 24) -> None:
    a = FeatureStore(sorted(a_dir.glob("shard-*.zarr")))
    b = FeatureStore(sorted(b_dir.glob("shard-*.zarr")))
    assert a.volume_ids == b.volume_ids and len(a) == n
    for vid in a.volume_ids:
        for name in FEATURE_ARRAYS:
            np.testing.assert_allclose(a[vid][name].astype(np.float32), b[vid][name].astype(np.float32),
                                       rtol=1e-2, atol=1e-2, err_msg=f"{vid} {name}")


def test_train_with_two_processes_inside_a_slurm_job(cluster: LocalSlurm, demo_run: Path, tmp_path: Path) -> None:
    """`train.processes: 2` on CPU: model/launch.py starts two gloo ranks (torchrun) in one SLURM job."""
    wd = copy_of(demo_run, tmp_path / "wd")
    two = tmp_path / "two_processes.yaml"
    two.write_text("train: {processes: 2}\n", encoding="utf-8")
    run = run_through_slurm(cluster, wd, "--configfile", str(E2E_CONFIG), str(two),
                            "--forcerun", "train_stage1", "--until", "train_stage1")
    assert [(rule_of(j["comment"]), j["state"]) for j in run.jobs] == [("train_stage1", "COMPLETED")], run.jobs
    assert run.info[run.jobs[0]["id"]]["NumCPUs"] == "2"
    out = wd / "results" / "experiments" / "full" / "stage1"
    start = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()
             if '"event"' in line][0]
    assert start["event"] == "start" and start["num_processes"] == 2, start
    ranks = start["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1] and len({r["pid"] for r in ranks}) == 2, ranks
    job_log = (wd / "results" / "logs" / "train" / "full-stage1.log").read_text(encoding="utf-8", errors="replace")
    assert "model.launch (torchrun)" in job_log and "--nproc_per_node 2" in job_log
    assert (out / "medregion_config.json").is_file()
    print(f"\ntrain_stage1 with 2 gloo processes through SLURM: {run.wall:.0f} s")


@pytest.fixture(scope="module")
def slurm_run(cluster: LocalSlurm, tmp_path_factory: pytest.TempPathFactory) -> SlurmRun:
    """The whole demo from nothing through the SLURM profile; one features job killed mid-run."""
    workdir = tmp_path_factory.mktemp("slurm-workflow")
    run = run_through_slurm(cluster, workdir, "all", kill=KILLED,
                            started=workdir / "results" / "logs" / "features" / "r2-shard-0.log")
    (workdir / "wall_seconds.txt").write_text(f"{run.wall:.1f}\n", encoding="utf-8")
    return run


def rule_of(comment: str) -> str:
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def planned_jobs(log: str) -> int:
    """The `total` of the first "Job stats" table Snakemake prints for a run."""
    return int(re.search(r"Job stats:.*?\ntotal\s+(\d+)", log, re.S).group(1))


def test_every_job_went_through_sbatch(slurm_run: SlurmRun) -> None:
    jobs, log = slurm_run.jobs, slurm_run.log
    assert jobs, "no job reached the cluster"
    submitted = dict(re.findall(r"has been submitted with SLURM jobid (\d+) \(log: (\S+?)\)", log))
    assert set(submitted) == {j["id"] for j in jobs}, (sorted(submitted), jobs)
    # every job of the DAG but the localrule `all` ran on the cluster, nothing else ran locally
    completed = [j for j in jobs if j["state"] == "COMPLETED"]
    assert len(completed) == planned_jobs(log) - 1, (planned_jobs(log), jobs)
    assert {rule_of(j["comment"]) for j in completed} == REMOTE_RULES
    assert re.findall(r"^localrule (\w+):", log, re.M) == ["all"]
    assert all(j["state"] in {"COMPLETED", "CANCELLED"} for j in jobs), jobs
    # the profile's SLURM logs: one per submitted job, kept for successful jobs too
    logs = {p.stem for p in (slurm_run.workdir / ".snakemake" / "slurm_logs").rglob("*.log")}
    assert logs == set(submitted)
    assert all(Path(path).is_file() for path in submitted.values())
    # resources from the profile reach sbatch: GPUs for features / generate, threads as CPUs, memory
    # and runtime from set-resources
    profile = yaml.safe_load((PROFILE / "config.yaml").read_text(encoding="utf-8"))["set-resources"]
    for job in completed:
        rule, info = rule_of(job["comment"]), slurm_run.info[job["id"]]
        gpus = info.get("TresPerJob", "")
        assert ("gpu:1" in gpus) == (rule in GPU_RULES), (job, gpus)
        if rule in {"features", "regions", "train_stage1", "train_stage2", "generate"}:
            assert info["NumCPUs"] == "2", (job, info["NumCPUs"])
        assert info["MinMemoryNode"] == f"{profile[rule]['mem_mb']}M", (job, info["MinMemoryNode"])
        days, minutes = divmod(profile[rule]["runtime"], 24 * 60)
        limit = (f"{days}-" if days else "") + f"{minutes // 60:02d}:{minutes % 60:02d}:00"
        assert info["TimeLimit"] == limit, (job, info["TimeLimit"])


def test_the_killed_job_of_the_full_demo_was_retried(slurm_run: SlurmRun) -> None:
    assert_killed_once_and_retried(slurm_run, KILLED)


def assert_same_table(a: Path, b: Path) -> None:
    pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), obj=str(a.name))


def test_slurm_outputs_equal_the_local_run(slurm_run: SlurmRun, demo_run: Path) -> None:
    local, remote = demo_run / "results", slurm_run.workdir / "results"
    tables = sorted(p.relative_to(local) for p in local.rglob("*.parquet") if "demo" not in p.parts)
    assert {"cohort.parquet", "reports/test.parquet", "attributes/shard-2.parquet", "qc/regions/shard-0.parquet",
            "experiments/full/predictions.parquet"} <= {str(t) for t in tables}
    for table in tables:
        assert_same_table(local / table, remote / table)
    # every volume: shard 0 is the retried job's output
    assert_same_features(local / "features" / "demo-dinov2-r2", remote / "features" / "demo-dinov2-r2")
    m_local = json.loads((local / "experiments" / "full" / "metrics.json").read_text(encoding="utf-8"))
    m_remote = json.loads((remote / "experiments" / "full" / "metrics.json").read_text(encoding="utf-8"))
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        assert m_remote["nlg"]["report"][name]["value"] == pytest.approx(m_local["nlg"]["report"][name]["value"],
                                                                         abs=1e-6), name
    t_local = pd.read_csv(local / "tables" / "ablation.csv")
    t_remote = pd.read_csv(remote / "tables" / "ablation.csv")
    pd.testing.assert_frame_equal(t_local, t_remote, atol=1e-6)
    local_wall = float((demo_run / "wall_seconds.txt").read_text(encoding="utf-8"))
    # the jobs' own run time (Snakemake benchmarks) tells the scheduling overhead from a busy machine
    job_s = {name: sum(float(pd.read_csv(f, sep="\t")["s"].iloc[-1]) for f in (res / "benchmarks").rglob("*.tsv"))
             for name, res in (("slurm", remote), ("local", local))}
    print(f"\nSLURM run {slurm_run.wall:.0f} s (jobs' own time {job_s['slurm']:.0f} s; one job killed and retried)"
          f" vs local run {local_wall:.0f} s (jobs' own time {job_s['local']:.0f} s):"
          f" overhead x{slurm_run.wall / local_wall:.2f} in wall time,"
          f" {slurm_run.wall - job_s['slurm']:.0f} s vs {local_wall - job_s['local']:.0f} s outside the jobs")
