from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from slurm_cluster import SessionSlurm, readers_last

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_image(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write a (z, y, x) array as a NIfTI with the given geometry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def write_box_masks(folder: Path, shape: tuple[int, int, int], names: list[str], seed: int, start_max: int,
                    length_max: tuple[int, int, int]) -> Path:
    """A zero int16 CT `folder/v.nii.gz` and one random 0/1 box mask per name in `folder/seg`
    (corner below `start_max` on each axis, side below `length_max`); returns the CT's path."""
    rng = np.random.default_rng(seed)
    ct = write_image(folder / "v.nii.gz", np.zeros(shape, np.int16))
    for name in names:
        m = np.zeros(shape, np.uint8)
        z, y, x = rng.integers(0, start_max, 3)
        m[z : z + rng.integers(1, length_max[0]), y : y + rng.integers(1, length_max[1]),
          x : x + rng.integers(1, length_max[2])] = 1
        write_image(folder / "seg" / f"{name}.nii.gz", m)
    return ct


def split_labelmap(labelmap: Path, names: dict[int, str], folder: Path) -> Path:
    """A label map as per-structure files, one binary file per class, empty ones included (what
    TotalSegmentator writes without --ml); returns the folder."""
    image = sitk.ReadImage(str(labelmap))
    lab = sitk.GetArrayFromImage(image)
    folder.mkdir(parents=True)
    for idx, name in names.items():
        mask = sitk.GetImageFromArray((lab == idx).astype(np.uint8))
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / f"{name}.nii.gz"), useCompression=True)
    return folder


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    return SHARED_DATA


E2E_CONFIG = REPO / "tests" / "data" / "e2e_config.yaml"


def no_network_prefix() -> list[str]:
    """`unshare -n`: run in a fresh network namespace with no route anywhere, when we may."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def snakemake_command(workdir: Path, *args: str, env: dict[str, str] | None = None, offline: bool = False,
                      configfiles: Sequence[Path] = (E2E_CONFIG,)) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of `snakemake()` (which documents the arguments)."""
    prefix = no_network_prefix() if offline else []
    cmd = [*prefix, sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
           "--configfile", *map(str, configfiles), "--cores", "2", *args]
    return cmd, {**(env or os.environ), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def snakemake(workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None,
              timeout: float = 1800, offline: bool = False,
              configfiles: Sequence[Path] = (E2E_CONFIG,)) -> subprocess.CompletedProcess[str]:
    """Run the project's workflow in `workdir` with `configfiles` over config/config.yaml (default: the
    end-to-end test config); `check` raises with Snakemake's output when it fails.

    `offline=True` runs it in a network namespace of its own (nothing reachable), where possible.
    """
    cmd, env = snakemake_command(workdir, *args, env=env, offline=offline, configfiles=configfiles)
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The end-to-end demo workflow, run once per test session; returns its working directory."""
    import time

    workdir = tmp_path_factory.mktemp("workflow")
    t0 = time.perf_counter()
    # offline by construction: the whole demo runs with no network at all (where unshare works)
    snakemake(workdir, "all", offline=True)
    (workdir / "wall_seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}\n", encoding="utf-8")
    (workdir / "network.txt").write_text("none\n" if no_network_prefix() else "host\n", encoding="utf-8")
    return workdir


# ---- a real one-node SLURM cluster (tests/slurm_cluster.py), shared by the session -----------------
# The whole demo through SLURM spends most of its wall time in the executor's squeue backoff, not on
# the CPUs: it starts in a background thread as soon as the session's tests are known, and the tests
# that read it go last, so the tests before them fill that wait.

SESSION_SLURM = SessionSlurm()
SLURM_DEMO_USERS = {"slurm_run", "second_run"}  # fixtures that need the session's SLURM demo


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: start only for the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ordered = readers_last(items, SLURM_DEMO_USERS)
    if ordered is None or config.option.collectonly:
        return
    items[:] = ordered
    SESSION_SLURM.start_demo()


def pytest_sessionfinish(session: pytest.Session) -> None:
    SESSION_SLURM.stop()


@pytest.fixture(scope="session")
def cluster():
    """The session's cluster, once the background demo (if any) has finished: tests that submit
    jobs of their own do not share it with that run."""
    return SESSION_SLURM.cluster()


@pytest.fixture(scope="session")
def slurm_run(cluster):
    """The whole demo from nothing through the SLURM profile, one features job killed mid-run and
    retried. tests/test_slurm.py checks the scheduling; tests/test_determinism.py compares its outputs
    with `demo_run`'s (so the session runs the demo twice, not three times)."""
    return SESSION_SLURM.demo()
