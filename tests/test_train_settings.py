"""Training settings: one frozen dataclass (model/train_settings.py TrainSettings) and the schema's
`train.stage1` / `train.stage2` sections say the same thing, and a misspelled key stops a run.

- the schema's defaults of each stage section equal the dataclass's defaults for that stage (lr and
  batch_size differ by stage), so neither can drift; every key has a type and a description;
- the JSON the train rule passes (`{**train.stage<N>, **experiment, log_with}`) parses into the dataclass;
- a misspelled key is refused by the workflow's check and by `python -m model.train`, naming the
  nearest key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from model.train import DEFAULTS, resolve_params
from model.train_settings import (
    SET_ELSEWHERE,
    STAGE_DEFAULTS,
    TrainConfigError,
    TrainSettings,
    parse_train_settings,
    stage_defaults,
)
from pipeline.config_check import check_unknown_keys, schema_defaults, section_schema

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stage", [1, 2])
def test_schema_defaults_are_the_dataclass_defaults(stage):
    expected = {k: v for k, v in stage_defaults(stage).to_dict().items() if k not in SET_ELSEWHERE}
    assert schema_defaults(f"train.stage{stage}") == expected
    schema = section_schema(f"train.stage{stage}")
    assert schema["additionalProperties"] is False
    for key, sub in schema["properties"].items():
        assert sub.get("type") and sub.get("description", "").strip(), f"train.stage{stage}.{key}"


def test_stage_defaults_are_the_papers():
    assert stage_defaults(1).lr == 1e-4 and stage_defaults(1).batch_size == 4
    assert stage_defaults(2).lr == 2e-5 and stage_defaults(2).batch_size == 1
    assert set(STAGE_DEFAULTS[1]) == set(STAGE_DEFAULTS[2]) == {"lr", "batch_size"}
    assert DEFAULTS["lr"] is None and DEFAULTS["batch_size"] is None
    assert list(DEFAULTS) == [f.name for f in dataclasses.fields(TrainSettings)]


def test_the_keys_set_elsewhere_are_the_experiment_and_tracker_keys():
    experiment = section_schema("experiments")["additionalProperties"]["properties"]
    assert set(SET_ELSEWHERE) == set(experiment) | {"log_with"}
    assert "log_with" in section_schema("train")["properties"]
    assert section_schema("train")["additionalProperties"] is False


@pytest.mark.parametrize("stage", [1, 2])
def test_the_rule_params_parse(stage):
    """What train.smk's train_params passes: the filled stage section, the experiment, the tracker."""
    given = {**schema_defaults(f"train.stage{stage}"), "epochs": 5,
             "pooling": "lita", "use_mask_tokens": False, "use_attributes": False, "log_with": "tensorboard"}
    settings = parse_train_settings(stage, json.dumps(given))
    assert settings.to_dict() == {**stage_defaults(stage).to_dict(), **given}
    assert isinstance(settings.lora_targets, tuple)  # frozen and hashable
    assert resolve_params(stage, json.dumps(given)) == settings.to_dict()
    assert resolve_params(stage, "{}") == stage_defaults(stage).to_dict()


def test_bad_settings_raise_a_train_config_error():
    with pytest.raises(TrainConfigError, match="did you mean 'epochs'"):
        parse_train_settings(1, {"epoch": 2})
    with pytest.raises(TrainConfigError, match="must be a JSON object"):
        parse_train_settings(1, "[1, 2]")
    with pytest.raises(TrainConfigError, match="select_by must be one of"):
        parse_train_settings(2, {"select_by": "bleu"})
    with pytest.raises(TrainConfigError, match="did you mean 'lr'"):
        resolve_params(2, json.dumps({"lrr": 1e-3}))


def test_the_workflow_refuses_a_misspelled_key():
    with pytest.raises(ValueError, match=r"train\.stage2\.lora_dropuot.*did you mean 'lora_dropout'"):
        check_unknown_keys({"train": {"stage2": {"lora_dropuot": 0.2}}})
    with pytest.raises(ValueError, match=r"train\.stage1\.pooling"):  # the experiment's, not the stage's
        check_unknown_keys({"train": {"stage1": {"pooling": "lita"}}})
    check_unknown_keys({"train": {"stage1": {"lr": 1e-3}, "log_with": "tensorboard"}})


@pytest.mark.parametrize(("typo", "nearest"), [("lrr", "lr"), ("lora_dropuot", "lora_dropout")])
def test_the_cli_refuses_a_misspelled_key_naming_the_nearest(tmp_path, typo, nearest):
    cmd = [sys.executable, "-m", "model.train", "--stage", "2", "--params-json", json.dumps({typo: 0.1}),
           "--features", str(tmp_path / "none.zarr"), "--train-reports", "t.parquet", "--val-reports", "v.parquet",
           "--llm", str(tmp_path / "llm"), "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          encoding="utf-8", errors="replace", timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"unknown config key 'train.stage2.{typo}'; did you mean '{nearest}'?"
    assert not (tmp_path / "out").exists()  # refused before anything is built
