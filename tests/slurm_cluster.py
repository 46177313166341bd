"""A real one-node SLURM cluster for tests: munged + slurmctld + slurmd from Debian's packages.

Everything lives in a temporary folder (config, spool, logs, PID files); clients find the cluster
through `SLURM_CONF`, so nothing under /etc/slurm is touched. Requires root (slurmd runs jobs as
the submitting user) and `apt-get install slurm-wlm munge`. Works without systemd or cgroups
(proctrack/linuxproc, task/none) and without an accounting database (Snakemake's SLURM executor
then polls with squeue, which needs MinJobAge >= 600 s to see finished jobs).

One fake GPU is declared through `gres.conf` (`File=/dev/null`), so GPU resources are scheduled as
on a real GPU node. The node's memory is the declared `mem_mb` (`SlurmdParameters=config_overrides`:
slurmd does not drain a node whose RAM is below it; memory is scheduled, not enforced, under task/none).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Snakemake's slurm-jobstep executor drops SLURM_CONF before its nested `srun`, which then looks for
# the default config path: the cluster links its config there for its lifetime (only if absent).
ETC_CONF = Path("/etc/slurm/slurm.conf")
REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


def unavailable_reason() -> str | None:
    """Why a local cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "the SLURM test cluster needs root (slurmd runs jobs as the submitting user)"
    missing = [t for t in REQUIRED if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if missing:
        return f"SLURM/munge not installed (missing {missing}): apt-get install slurm-wlm munge"
    if not Path("/etc/munge/munge.key").exists():
        return "no munge key at /etc/munge/munge.key"
    _remove_stale_link()
    if ETC_CONF.exists() or ETC_CONF.is_symlink():
        return f"{ETC_CONF} exists: this machine has a SLURM setup of its own; not touching it"
    return None


def _remove_stale_link() -> None:
    """A link left by a test cluster that was killed before its teardown (its slurmctld is gone)."""
    if not ETC_CONF.is_symlink():
        return
    target = Path(os.readlink(ETC_CONF))
    if not target.parent.name.startswith("medregion-slurm-"):
        return
    pid_file = target.parent / "run" / "slurmctld.pid"
    try:
        os.kill(int(pid_file.read_text(encoding="utf-8").strip()), 0)
    except (OSError, ValueError):
        ETC_CONF.unlink()


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass
class LocalSlurm:
    root: Path
    cpus: int = 2
    mem_mb: int = 16000
    gpus: int = 1
    partition: str = "debug"
    pids: dict[str, Path] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def write_config(self) -> None:
        host = socket.gethostname().split(".")[0]
        for sub in ("spool/ctld", "spool/d", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        gres_node = f"Gres=gpu:fake:{self.gpus}" if self.gpus else ""
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"NodeName={host} Name=gpu Type=fake File=/dev/null\n" for _ in range(self.gpus)),
            encoding="utf-8",
        )
        run, log = self.root / "run", self.root / "log"
        (self.root / "slurm.conf").write_text(f"""\
ClusterName=medregiontest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.root}/munge/munge.sock
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
StateSaveLocation={self.root}/spool/ctld
SlurmdSpoolDir={self.root}/spool/d
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldPort=16817
SlurmdPort=16818
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName={host} CPUs={self.cpus} RealMemory={self.mem_mb} {gres_node} State=UNKNOWN
PartitionName={self.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""", encoding="utf-8")

    def start(self) -> None:
        self.write_config()
        ETC_CONF.parent.mkdir(parents=True, exist_ok=True)
        ETC_CONF.symlink_to(self.root / "slurm.conf")
        self._linked = True
        # munged runs as the munge user and insists on owning its folders (and on a traversable path).
        self.root.chmod(0o755)
        munge = self.root / "munge"
        munge.mkdir(mode=0o755, exist_ok=True)
        os.chown(munge, _uid("munge"), -1)
        subprocess.run(["runuser", "-u", "munge", "--", _exe("munged"), f"--socket={munge}/munge.sock",
                        f"--pid-file={munge}/munged.pid", "--key-file=/etc/munge/munge.key",
                        f"--log-file={munge}/munged.log", f"--seed-file={munge}/munged.seed"],
                       check=True)
        self.pids["munged"] = munge / "munged.pid"
        run = self.root / "run"
        env = self.env
        subprocess.run([_exe("slurmctld"), "-i", "-f", str(self.root / "slurm.conf")], check=True, env=env)
        self.pids["slurmctld"] = run / "slurmctld.pid"
        self._wait(lambda: "UP" in self._out(["scontrol", "ping"]), "slurmctld")
        subprocess.run([_exe("slurmd"), "-f", str(self.root / "slurm.conf")], check=True, env=env)
        self.pids["slurmd"] = run / "slurmd.pid"
        self._wait(lambda: self._out(["sinfo", "-h", "-o", "%t"]).strip() == "idle", "slurmd")

    def _out(self, cmd: list[str]) -> str:
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", env=self.env)
        return proc.stdout

    def _wait(self, ok, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ok():
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text(encoding="utf-8", errors="replace")[-1500:] for p in (self.root / "log").glob("*.log"))
        raise RuntimeError(f"{what} did not come up:\n{logs}")

    def stop(self) -> None:
        """Stop every daemon this cluster started, by PID, newest first; remove the config link."""
        if getattr(self, "_linked", False) and ETC_CONF.is_symlink():
            ETC_CONF.unlink()
            self._linked = False
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.pids.pop(name, None)
            if pid_file is None or not pid_file.exists():
                continue
            pid = int(pid_file.read_text(encoding="utf-8").strip() or 0)
            if pid <= 0:
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)

    def jobs(self) -> list[dict[str, str]]:
        """Every job the cluster knows (finished ones stay visible for MinJobAge)."""
        out = self._out(["squeue", "--states=all", "-h", "-o", "%i|%j|%T|%k"])
        jobs = [dict(zip(("id", "name", "state", "comment"), line.split("|"))) for line in out.splitlines() if line]
        return sorted(jobs, key=lambda j: int(j["id"]) if j["id"].isdigit() else 0)

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs too, for MinJobAge): TresPerJob, NumCPUs, ..."""
        out = self._out(["scontrol", "show", "job", "-o", job_id])
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def cancel(self, job_id: str) -> None:
        """`scancel` one job, as a user (or a node failure) would kill it."""
        subprocess.run(["scancel", job_id], check=True, capture_output=True, encoding="utf-8", errors="replace",
                       env=self.env)


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid

# ---- the demo workflow through the cluster (tests/conftest.py's `slurm_run`, tests/test_slurm.py) --------

PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "slurm"
# the job killed mid-run (the plugin puts `rule_<name>_wildcards_<values>` into the job comment)
KILLED = "rule_features_wildcards_r2_0"


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
                      started: Path | None = None, timeout: float = 2400,
                      running: list[subprocess.Popen[str]] | None = None) -> SlurmRun:
    """Snakemake with the SLURM profile in `workdir`; with `kill`, that job is scancel'ed once mid-run.
    `running`, when given, holds the Snakemake process while it runs (so that it can be stopped)."""
    from helpers import snakemake_command  # how every test runs the workflow

    before = {j["id"] for j in cluster.jobs()}
    watch = Watch(cluster, kill or "", started or workdir / "never")
    watch.start()
    t0 = time.perf_counter()
    cmd, env = snakemake_command(workdir, "--workflow-profile", str(PROFILE), "--jobs", "4", *args, env=cluster.env)
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                            errors="replace", env=env, start_new_session=True)
    if running is not None:
        running.append(proc)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # Snakemake cancels its SLURM jobs on SIGTERM
        out, _ = proc.communicate()
        raise AssertionError(f"snakemake through SLURM did not finish in {timeout:.0f} s:\n{out[-6000:]}") from None
    finally:
        watch.done.set()
        watch.join()
        if running is not None and proc in running:
            running.remove(proc)
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} through SLURM failed:\n{out[-10000:]}")
    wall = time.perf_counter() - t0
    jobs = {**watch.seen, **{j["id"]: j for j in cluster.jobs()}}
    jobs = [jobs[i] for i in sorted(jobs, key=int) if i not in before]
    return SlurmRun(workdir, wall, out, jobs, watch.info, watch.killed)


def readers_last(items: list, fixtures: set[str]) -> list | None:
    """`items` with those that use any of `fixtures` moved to the end (order kept within each part),
    or None when none does."""
    readers = [item for item in items if fixtures & set(getattr(item, "fixturenames", ()))]
    if not readers:
        return None
    return [item for item in items if item not in readers] + readers


class SessionSlurm:
    """The test session's cluster and its whole-demo run (tests/conftest.py).

    `start_demo` starts, in a background thread, the cluster and the demo from nothing through the
    profile with one features job killed mid-run (`KILLED`). `cluster()` and `demo()` wait for that
    thread; they skip with the reason where no cluster can start here, and raise what the run raised.
    Without `start_demo`, `cluster()` starts the cluster in the calling thread.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._cluster: LocalSlurm | None = None
        self._skip: str | None = None
        self._error: BaseException | None = None
        self._run: SlurmRun | None = None
        self._running: list[subprocess.Popen[str]] = []

    def _start_cluster(self) -> None:
        import importlib.util
        import tempfile

        reason = unavailable_reason()
        if reason is None and importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
            reason = "snakemake-executor-plugin-slurm not installed"
        if reason:
            self._skip = reason
            return
        # munged runs as the munge user: its folder must be reachable, which pytest's 0700 tmp root is not
        cluster = LocalSlurm(Path(tempfile.mkdtemp(prefix="medregion-slurm-")))
        try:
            cluster.start()
        except BaseException:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
            raise
        self._cluster = cluster

    def _demo(self) -> None:
        try:
            self._start_cluster()
            if self._cluster is None:
                return
            workdir = self._cluster.root / "slurm-workflow"
            workdir.mkdir()
            self._run = run_through_slurm(self._cluster, workdir, "all", kill=KILLED,
                                          started=workdir / "results" / "logs" / "features" / "r2-shard-0.log",
                                          running=self._running)
            (workdir / "wall_seconds.txt").write_text(f"{self._run.wall:.1f}\n", encoding="utf-8")
        except BaseException as error:  # handed to the tests that read the run
            self._error = error

    def start_demo(self) -> None:
        if self._thread is None and self._cluster is None:
            self._thread = threading.Thread(target=self._demo, name="slurm-demo", daemon=True)
            self._thread.start()

    def _wait(self) -> None:
        import pytest

        if self._thread is not None:
            self._thread.join()
        elif self._cluster is None and self._skip is None:
            self._start_cluster()
        if self._skip:
            pytest.skip(self._skip)
        if self._cluster is None and self._error is not None:
            raise self._error

    def cluster(self) -> LocalSlurm:
        self._wait()
        assert self._cluster is not None
        return self._cluster

    def demo(self) -> SlurmRun:
        self._wait()
        if self._error is not None:
            raise self._error
        if self._run is None:
            raise RuntimeError("the session's SLURM demo was not started (SessionSlurm.start_demo)")
        return self._run

    def stop(self) -> None:
        """Stop a run still going (an interrupted session), then the cluster; remove its folder."""
        for proc in list(self._running):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self._cluster is not None:
            import getpass

            subprocess.run(["scancel", "--user", getpass.getuser()], capture_output=True, env=self._cluster.env)
            self._cluster.stop()
            shutil.rmtree(self._cluster.root, ignore_errors=True)
            self._cluster = None
