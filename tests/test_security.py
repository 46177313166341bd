"""Static checks that keep unsafe loading out of the code base, and the offline demo run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import REPO

SOURCES = sorted(p for d in ("pipeline", "model", "benchmarks") for p in (REPO / d).rglob("*.py"))


def _code_lines(path: Path):
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.split("#", 1)[0]
        if stripped.strip():
            yield n, stripped


def test_no_pickle_and_torch_load_only_weights_only() -> None:
    bad = []
    for path in SOURCES:
        for n, line in _code_lines(path):
            if re.search(r"\bimport pickle\b|\bpickle\.loads?\(|\bjoblib\.load\(|np\.load\([^)]*allow_pickle=True", line):
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
            if "torch.load(" in line and "weights_only=True" not in line:
                bad.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not bad, "unsafe deserialisation:\n" + "\n".join(bad)


def test_trust_remote_code_never_hard_enabled() -> None:
    bad = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in _code_lines(p)
           if re.search(r"trust_remote_code\s*=\s*True", line)]
    assert not bad, f"trust_remote_code=True hard-coded at {bad}"


def test_weights_are_written_as_safetensors() -> None:
    bad = [f"{p.relative_to(REPO)}:{n}" for p in SOURCES for n, line in _code_lines(p)
           if "torch.save(" in line]
    assert not bad, f"torch.save (pickle) of weights at {bad}: use safetensors"


@pytest.mark.slow
def test_demo_ran_without_any_network(demo_run: Path) -> None:
    if (demo_run / "network.txt").read_text(encoding="utf-8").strip() != "none":
        pytest.skip("no network namespace here (needs root and unshare): ran with the host network")
    # the fixture's run succeeded inside `unshare -n`: every stage, models included, ran offline
    assert (demo_run / "results" / "experiments" / "full" / "metrics.json").is_file()
