"""The workflow on a real one-node SLURM cluster, through `--workflow-profile profiles/slurm`.

Where the cluster can run: a GPU job; the whole demo from nothing through the profile, every job
submitted with sbatch, one `features` job killed with `scancel` mid-run and retried by Snakemake
(`retries` in the profile; its outputs equal the local run's, checked by tests/test_determinism.py);
`train_stage1` with `train.processes: 2`, two gloo ranks inside one SLURM job. Skipped, with the
reason, where the cluster cannot run (not root, slurm-wlm/munge not installed).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import slurm_cluster
import yaml
from helpers import E2E_CONFIG
from slurm_cluster import KILLED, PROFILE, LocalSlurm, SessionSlurm, SlurmRun, readers_last, run_through_slurm

pytestmark = pytest.mark.slow
# every rule of the demo's DAG but `all` (a localrule that only gathers files)
REMOTE_RULES = {"demo_cohort", "demo_encoder", "demo_llm", "cohort", "reports", "segment", "regions",
                "attributes", "features", "train_stage1", "train_stage2", "generate", "evaluate",
                "ablation_table", "report_samples", "ca_per_class_chart"}
GPU_RULES = {"features", "generate"}


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


# ---- the session's background run (no cluster needed) -------------------------------------------


def test_readers_of_the_session_demo_go_last_in_their_order():
    class Item:
        def __init__(self, name: str, *fixtures: str) -> None:
            self.name, self.fixturenames = name, list(fixtures)

    items = [Item("a", "tmp_path"), Item("det", "demo_run", "second_run"), Item("b"), Item("slurm", "slurm_run"),
             Item("c", "cluster")]
    ordered = readers_last(items, {"slurm_run", "second_run"})
    assert [i.name for i in ordered] == ["a", "b", "c", "det", "slurm"]
    assert readers_last(items[:1], {"slurm_run"}) is None  # no reader: nothing starts, order untouched


def test_session_without_a_cluster_skips_both_fixtures_with_the_reason(monkeypatch):
    monkeypatch.setattr(slurm_cluster, "unavailable_reason", lambda: "no cluster here (test)")
    session = SessionSlurm()
    session.start_demo()
    for wait in (session.demo, session.cluster):
        with pytest.raises(pytest.skip.Exception, match="no cluster here"):
            wait()
    session.stop()  # nothing started: nothing to stop, no error
