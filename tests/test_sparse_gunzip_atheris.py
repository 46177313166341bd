"""Coverage-guided fuzzing of the sparse inflater against zlib (tests/sparse_gunzip_atheris.py), briefly:
a build with libFuzzer coverage, AddressSanitizer and UBSan; the run fails on a crash, on undefined
behaviour, or on any input where the sparse inflater and zlib disagree. `benchmarks/fuzz_sparse_gunzip.py`
runs the same harness longer."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import sparse_gunzip_atheris as harness
from helpers import REPO

RUNS = 30_000  # ~20-40 s on one core


def test_coverage_guided_fuzzing_finds_no_crash_or_disagreement(tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="atheris is not installed (pip install atheris)")
    try:
        env_add = harness.build(str(tmp_path / "sg_fuzz.so"))
    except (FileNotFoundError, subprocess.CalledProcessError) as exc:
        if os.environ.get("CI"):
            raise  # CI installs clang and its runtimes: a missing toolchain there is a failure
        pytest.skip(f"cannot build the instrumented extension: {exc}")
    env = {**os.environ, **dict(kv.split("=", 1) for kv in env_add)}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sparse_gunzip_atheris.py"), str(tmp_path / "sg_fuzz.so"),
                           f"-runs={RUNS}", "-seed=7", *harness.MEMORY_LIMITS, f"-artifact_prefix={tmp_path}/",
                           str(tmp_path / "corpus")],
                          capture_output=True, encoding="utf-8", errors="replace", env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Done {RUNS} runs" in proc.stderr
    cov = [int(line.split("cov: ")[1].split()[0]) for line in proc.stderr.splitlines() if " cov: " in line]
    assert cov and max(cov) > 100  # the C extension's edges were instrumented and reached


class _Lying:
    """An inflater that says ok and writes nothing: the oracle must catch it."""

    @staticmethod
    def gunzip(data, out, vox, nx, ny, dirty):
        return 0, len(out), 0, 0, (0, 0, 0, 0, 0, 0)

    @staticmethod
    def clear(*args):
        return None


def test_the_oracle_catches_a_decoder_that_disagrees_with_zlib(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = (np.arange(3000) % 7 == 0).astype(np.uint8).tobytes()
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    data = bytes([0, 15, 3, 0, 1]) + c.compress(raw) + c.flush()
    from pipeline import _sparse_gunzip as sg

    monkeypatch.setattr(harness, "SG", sg)
    harness.check_one(data)  # the real inflater agrees with zlib
    monkeypatch.setattr(harness, "SG", _Lying)
    with pytest.raises(AssertionError, match="differ"):
        harness.check_one(data)
