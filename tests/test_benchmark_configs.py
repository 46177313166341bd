"""The overlay configs in benchmarks/configs/ stay valid as the schema and the trainer change: each one,
merged over config/config.yaml the way Snakemake merges --configfile, passes the schema, and names only
training parameters `model.train` knows (the schema's train.stage1 / stage2 list them, closed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.train import DEFAULTS

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = sorted((REPO / "benchmarks" / "configs").glob("*.yaml"))


def _validated(overlay: dict) -> dict:
    from snakemake.utils import update_config, validate

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text(encoding="utf-8"))
    update_config(config, overlay)  # what snakemake does with each further --configfile
    validate(config, str(REPO / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def test_there_are_overlays():
    assert len(OVERLAYS) >= 5


@pytest.mark.parametrize("path", OVERLAYS, ids=[p.name for p in OVERLAYS])
def test_benchmark_overlay_is_a_valid_config(path: Path):
    config = _validated(yaml.safe_load(path.read_text(encoding="utf-8")))
    for stage in ("stage1", "stage2"):
        unknown = set(config["train"].get(stage, {})) - set(DEFAULTS)
        assert not unknown, f"{path.name}: train.{stage} names unknown parameters {sorted(unknown)}"


def test_the_check_refuses_a_bad_overlay():
    from snakemake.exceptions import WorkflowError

    with pytest.raises(WorkflowError):
        _validated({"llm": {"demo_layers": "four"}})
    with pytest.raises(WorkflowError):  # a misspelled training parameter (train.stage<N> is closed)
        _validated({"train": {"stage2": {"epoch": 40}}})


def test_the_seed_overlay_reaches_the_demo_llm_and_both_training_commands(tmp_path):
    # llm.demo_seed and train.stage{1,2}.seed must change the commands the rules run, or a
    # "re-seeded" benchmark run silently repeats seed 0
    overlay = REPO / "benchmarks" / "configs" / "model_seed_2.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1", "all",
         "-n", "-p", "--configfile", str(REPO / "config" / "config.yaml"), str(overlay)],
        capture_output=True, text=True, check=True,
    ).stdout
    demo_llm = [line for line in out.splitlines() if "model.demo_llm" in line]
    train = [line for line in out.splitlines() if "--stage " in line and "--params-json" in line]
    assert demo_llm and all('"demo_seed": 2' in line for line in demo_llm)
    assert len(train) >= 2 and all('"seed": 2' in line for line in train)


def test_demo_pretrain_steps_reach_the_demo_llm_command(tmp_path):
    # the default stays 300 steps; a config's llm.demo_pretrain_steps (the end-to-end test config: 60)
    # must change the command, or the tests would pre-train for the default and pay for it
    def demo_llm_lines(*configs: Path) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path), "--cores", "1",
             "all", "-n", "-p", "--configfile", *map(str, configs)],
            capture_output=True, text=True, check=True,
        ).stdout
        return [line for line in out.splitlines() if "model.demo_llm" in line]

    default = demo_llm_lines(REPO / "config" / "config.yaml")
    e2e = demo_llm_lines(REPO / "config" / "config.yaml", REPO / "tests" / "data" / "e2e_config.yaml")
    assert default and all('"demo_pretrain_steps": 300' in line for line in default)
    assert e2e and all('"demo_pretrain_steps": 60' in line for line in e2e)
    # llm.demo_attribute_text: off by default (the LM reads reports only), on it passes every
    # attribute shard (model.demo_llm keeps the training volumes' blocks)
    assert all(line.split("--attributes")[1].split(">")[0].split() == [] for line in default)
    texts = demo_llm_lines(REPO / "config" / "config.yaml", REPO / "benchmarks" / "configs" / "demo_llm_attribute_text.yaml")
    shards = [f"results/attributes/shard-{i}.parquet" for i in range(4)]  # 80 volumes, shard_size 20
    assert texts and all(line.split("--attributes ")[1].split(">")[0].split() == shards for line in texts), texts
    # llm.demo_init_std: LLaMA's 0.02 by default, the overlay's value reaches the command
    assert all('"demo_init_std": 0.02' in line for line in default)
    init = demo_llm_lines(REPO / "config" / "config.yaml", REPO / "benchmarks" / "configs" / "demo_llm_init_0.08.yaml")
    assert init and all('"demo_init_std": 0.08' in line for line in init)
