"""pipeline/stage_config.py: how a stage's --params-json becomes its settings, and how a CLI refuses bad ones."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from helpers import REPO

from pipeline.stage_config import SettingsError, parse_settings, settings_from_cli


@dataclass(frozen=True)
class Inner:
    resamples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise SettingsError(f"resamples must be >= 1, got {self.resamples}")


@dataclass(frozen=True)
class Outer:
    name: str = "full"
    grid: tuple[int, int] = (8, 16)
    inner: Inner = field(default_factory=Inner)


def test_nested_settings_are_parsed_as_their_own_dataclass():
    s = parse_settings(Outer, '{"grid": [2, 3], "inner": {"seed": 7}}', section="evaluate")
    assert s == Outer(grid=(2, 3), inner=Inner(seed=7))
    assert isinstance(s.inner, Inner) and s.inner.resamples == 1000
    with pytest.raises(SettingsError, match=r"'evaluate\.inner\.resample'; did you mean 'resamples'"):
        parse_settings(Outer, {"inner": {"resample": 5}}, section="evaluate")


def test_bad_json_and_non_objects_are_settings_errors():
    with pytest.raises(SettingsError, match="not valid JSON"):
        parse_settings(Outer, "{grid: [2, 3]}", section="evaluate")
    with pytest.raises(SettingsError, match="must be a JSON object, got list"):
        parse_settings(Outer, "[1, 2]", section="evaluate")


def test_a_cli_refuses_bad_settings_with_its_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="python -m pipeline.example")
    for bad, message in (('{"nmae": "x"}', "did you mean 'name'"), ("{", "not valid JSON"),
                         ('{"inner": {"resamples": 0}}', "resamples must be >= 1")):
        with pytest.raises(SystemExit) as exit_:
            settings_from_cli(parser, Outer, bad, section="evaluate")
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: python -m pipeline.example") and "--params-json: " in err and message in err
    assert settings_from_cli(parser, Outer, "{}", section="evaluate") == Outer()


@pytest.mark.parametrize("module, args", [
    ("pipeline.attributes", ["--masks", "m.zarr", "--out", "a.parquet", "--qc", "q.parquet"]),
    ("model.generate", ["--model", "m", "--features", "f", "--attributes", "a", "--reports", "r", "--out", "o"]),
])
def test_stage_clis_refuse_a_misspelled_setting_without_a_traceback(tmp_path, module, args):
    proc = subprocess.run([sys.executable, "-m", module, *args, "--params-json", '{"threads_": 1}'],
                          cwd=tmp_path, capture_output=True, encoding="utf-8", env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "unknown config key" in proc.stderr
