"""The conda environments of envs/ (snakemake --use-conda) build where Snakemake puts them: no relative path
(Snakemake copies each file to .snakemake/conda/<hash>.yaml first), every package pinned, the pins inside
pyproject.toml's ranges, every rule's `conda:` file present. Conda's channels cannot be reached from the
test machines, so the environments are not created here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
import yaml
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ENVS = sorted((REPO / "envs").glob("*.yaml"))
# SAT's own environment pins SAT's old stack (transformers 4.21, numpy 1.21): it never imports the project.
PROJECT_ENVS = [p for p in ENVS if p.stem != "sat"]


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _declared() -> dict[str, Requirement]:
    """Every requirement pyproject.toml names (core and extras), by canonical name."""
    meta = _pyproject()["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    out: dict[str, Requirement] = {}
    for r in reqs:
        out.setdefault(canonicalize_name(r.name), r)
    return out


def _packages(env: dict) -> tuple[list[str], list[str]]:
    conda, pip = [], []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep.get("pip", [])
        else:
            conda.append(dep)
    return conda, pip


@pytest.mark.parametrize("path", ENVS, ids=[p.name for p in ENVS])
def test_env_parses_names_no_relative_path_and_pins_every_package(path: Path) -> None:
    env = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert env["channels"] and env["dependencies"]
    conda, pip = _packages(env)
    for entry in conda + pip:
        assert not re.search(r"(^|\s)(-e|--editable)\b|\.\./|\./|file:", entry), f"{path.name}: {entry!r} is a path"
    for entry in conda:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+=[0-9][0-9A-Za-z.*]*", entry), f"{path.name}: conda {entry!r} not pinned"
    for entry in pip:
        req = Requirement(entry)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"{path.name}: pip {entry!r} is not pinned with =="


@pytest.mark.parametrize("path", PROJECT_ENVS, ids=[p.name for p in PROJECT_ENVS])
def test_env_pins_lie_in_pyproject_ranges_and_cover_its_dependencies(path: Path) -> None:
    env = yaml.safe_load(path.read_text(encoding="utf-8"))
    _, pip = _packages(env)
    pinned = {canonicalize_name(Requirement(e).name): next(iter(Requirement(e).specifier)).version for e in pip}
    declared = _declared()
    for name, version in pinned.items():
        if name in declared:
            assert declared[name].specifier.contains(version, prereleases=True), (
                f"{path.name}: {name}=={version} is outside pyproject.toml's {declared[name]}")
    core = {canonicalize_name(Requirement(r).name) for r in _pyproject()["project"]["dependencies"]}
    missing = sorted(core - set(pinned))
    assert not missing, f"{path.name} lacks the project's dependencies {missing} (the project is not installed there)"


def test_torch_pin_is_the_one_ci_installs() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_torch = re.search(r"torch==([0-9.]+)", ci).group(1)
    for path in ENVS:
        _, pip = _packages(yaml.safe_load(path.read_text(encoding="utf-8")))
        for e in pip:
            if canonicalize_name(Requirement(e).name) == "torch" and path.stem != "sat":
                assert next(iter(Requirement(e).specifier)).version == ci_torch, path.name


def test_every_rule_names_an_existing_env_file() -> None:
    rules = sorted((REPO / "workflow" / "rules").glob("*.smk"))
    named = set()
    for smk in rules:
        for rel in re.findall(r"conda:\s*\n\s*\"([^\"]+)\"", smk.read_text(encoding="utf-8")):
            target = (smk.parent / rel).resolve()
            assert target.is_file(), f"{smk.name}: conda env {rel} does not exist"
            named.add(target.name)
    assert {"pipeline.yaml", "train.yaml", "evaluate.yaml"} <= named


def test_jobs_find_the_project_without_installing_it() -> None:
    """The Snakefile puts the repository on PYTHONPATH for every job (what lets the envs skip `pip install -e`)."""
    snakefile = (REPO / "Snakefile").read_text(encoding="utf-8")
    # snakefmt writes it as an f-string: f"...PYTHONPATH={workflow.basedir}${{{{PYTHONPATH:+:$PYTHONPATH}}}}..."
    assert re.search(r'shell\.prefix\(\s*f"[^"]*export PYTHONPATH=\{workflow\.basedir\}\$\{\{\{\{PYTHONPATH', snakefile)
