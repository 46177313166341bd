"""One way for config to flow: the schema declares every key (a typo stops `snakemake -n` naming the key and
the nearest valid one), fills every default, and each stage reads its section as one `--params-json` object
parsed into a frozen dataclass whose defaults are the schema's."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.demo_llm import DemoLLMSettings
from model.generate import GenerateSettings
from model.gguf_import import GgufImportSettings
from pipeline.attributes import AttributesSettings
from pipeline.config_check import check_unknown_keys, load_schema, schema_defaults
from pipeline.demo.cohort import DemoCohortSettings
from pipeline.evaluate.green import GreenSettings
from pipeline.evaluate.judge import JudgeSettings
from pipeline.evaluate.run import BootstrapSettings, EvaluateSettings, LabelerSettings
from pipeline.evaluate.table import AblationTableSettings
from pipeline.features.config import FeatureConfig
from pipeline.features.stage import DemoEncoderSettings
from pipeline.regions import RegionsSettings
from pipeline.report_samples import SamplesSettings
from pipeline.segment import SegmentSettings
from pipeline.stage_config import SettingsError, parse_settings

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "config" / "config.yaml"


def _dry_run(tmp_path: Path, overlay: dict | None) -> subprocess.CompletedProcess[str]:
    configs = [str(DEMO_CONFIG)]
    if overlay is not None:
        path = tmp_path / "overlay.yaml"
        path.write_text(yaml.safe_dump(overlay), encoding="utf-8")
        configs.append(str(path))
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path / "work"),
           "--cores", "1", "-n", "all", "--configfile", *configs]
    return subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=600)


@pytest.mark.parametrize(("overlay", "message"), [
    ({"shard_sise": 5}, "unknown config key 'shard_sise'; did you mean 'shard_size'?"),
    ({"features": {"compresor": "zstd"}}, "unknown config key 'features.compresor'; did you mean 'compressor'?"),
    ({"train": {"stage2": {"lora_rr": 8}}}, "unknown config key 'train.stage2.lora_rr'; did you mean 'lora_r'?"),
    ({"evaluate": {"bootstrap": {"resample": 10}}},
     "unknown config key 'evaluate.bootstrap.resample'; did you mean 'resamples'?"),
], ids=["top-level", "features", "train.stage2", "evaluate.bootstrap"])
def test_a_misspelled_key_stops_the_dry_run_naming_it(tmp_path: Path, overlay: dict, message: str) -> None:
    proc = _dry_run(tmp_path, overlay)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert message in out, out[-3000:]
    assert not (tmp_path / "work" / "results").exists()  # no job ran


def test_the_demo_config_passes_the_dry_run(tmp_path: Path) -> None:
    proc = _dry_run(tmp_path, None)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "unknown config key" not in proc.stdout + proc.stderr


def test_check_unknown_keys_walks_user_named_maps() -> None:
    base = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
    check_unknown_keys(base)
    # experiment names and finding kinds are the user's; their values are checked
    check_unknown_keys({**base, "experiments": {"mine": {"pooling": "r2"}}})
    check_unknown_keys({**base, "dataset": {"adapter": "demo", "demo": {"findings": {"Lung nodule": 1.0}}}})
    with pytest.raises(ValueError, match=r"'experiments\.mine\.poolin'; did you mean 'pooling'\?"):
        check_unknown_keys({**base, "experiments": {"mine": {"poolin": "r2"}}})
    with pytest.raises(ValueError, match=r"'evaluate\.labeler\.weigths'; did you mean 'weights'\?"):
        check_unknown_keys({**base, "evaluate": {"labeler": {"weigths": "w.pt"}}})
    with pytest.raises(ValueError, match=r"unknown config key 'frobnicate'; known: "):
        check_unknown_keys({**base, "frobnicate": 1})


def test_every_configured_file_names_only_declared_keys() -> None:
    from snakemake.utils import update_config

    for path in sorted([*REPO.glob("config/*.yaml"), *REPO.glob("benchmarks/configs/*.yaml"),
                        REPO / "tests" / "data" / "e2e_config.yaml"]):
        if path.name == "regions.yaml":  # the label table, not a workflow config
            continue
        config = yaml.safe_load(DEMO_CONFIG.read_text(encoding="utf-8"))
        update_config(config, yaml.safe_load(path.read_text(encoding="utf-8")))
        check_unknown_keys(config)


def _schema_default(dotted: str):
    """The schema default at a dotted path (`*`: the value schema of a user-named map)."""
    schema = load_schema()
    keys = dotted.split(".")
    for key in keys[:-1]:
        schema = schema["additionalProperties"] if key == "*" else schema["properties"][key]
    leaf = keys[-1]
    sub = schema["properties"][leaf]
    if "default" in sub and isinstance(sub["default"], dict):
        return schema_defaults(".".join(keys)) if "*" not in keys else sub["default"]
    assert "default" in sub, f"{dotted} has no schema default"
    return sub["default"]


def _plain(value):
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# settings dataclass -> its config section, and fields read from elsewhere in the config
STAGE_SETTINGS = [
    (AttributesSettings, "attributes", {}),
    (SegmentSettings, "segmentation", {}),
    (RegionsSettings, "regions", {"memory_cap_gb": "segmentation.memory_cap_gb"}),
    (DemoCohortSettings, "dataset.demo", {}),
    (DemoEncoderSettings, "features.encoder", {"channel_windows": "features.channel_windows"}),
    (DemoLLMSettings, "llm", {}),
    (FeatureConfig, "features", {"pooling": "experiments.*.pooling"}),
    (GenerateSettings, "generate", {}),
    (SamplesSettings, "report_samples", {}),
    (BootstrapSettings, "evaluate.bootstrap", {}),
    (LabelerSettings, "evaluate.labeler", {}),
    (EvaluateSettings, "evaluate", {}),
    (AblationTableSettings, "evaluate", {}),
    (GreenSettings, "evaluate.green", {}),
    (JudgeSettings, "evaluate.judge", {}),
    (GgufImportSettings, "llm", {}),
]
# the backends' own parameter blocks pass through SegmentSettings as mappings (the backend reads them)
PASSED_THROUGH = {(SegmentSettings, "sat"), (SegmentSettings, "totalsegmentator")}


@pytest.mark.parametrize(("cls", "section", "elsewhere"), STAGE_SETTINGS, ids=[c.__name__ for c, _, _ in STAGE_SETTINGS])
def test_stage_settings_defaults_are_the_schema_defaults(cls, section: str, elsewhere: dict[str, str]) -> None:
    for f in dataclasses.fields(cls):
        if (cls, f.name) in PASSED_THROUGH:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert f.default_factory is not dataclasses.MISSING, f"{cls.__name__}.{f.name} has no default"
            default = f.default_factory()
        expected = _schema_default(elsewhere.get(f.name, f"{section}.{f.name}"))
        assert _plain(default) == _plain(expected), f"{cls.__name__}.{f.name}: {default!r} != schema {expected!r}"
    # `--params-json '{}'` gives those defaults; an unknown key is refused naming the nearest one
    assert parse_settings(cls, "{}", section=section) == cls()
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(SettingsError, match=f"did you mean '{name}'"):
        parse_settings(cls, json.dumps({name + "x": 1}), section=section)


def test_evaluate_settings_parse_nested_sections() -> None:
    cfg = parse_settings(EvaluateSettings, '{"bootstrap": {"resamples": 200, "seed": 7}, "labeler": {"backend": "rules"}}',
                         section="evaluate")
    assert cfg.bootstrap == BootstrapSettings(200, 7) and cfg.labeler == LabelerSettings()
    with pytest.raises(SettingsError, match=r"evaluate\.bootstrap\.resample'; did you mean 'resamples'"):
        parse_settings(EvaluateSettings, '{"bootstrap": {"resample": 200}}', section="evaluate")


def test_rule_files_restate_no_schema_default() -> None:
    """`.get(key, default)` in a rule file would be a second copy of a schema default."""
    for path in [REPO / "Snakefile", *sorted((REPO / "workflow" / "rules").glob("*.smk"))]:
        text = path.read_text(encoding="utf-8")
        found = re.findall(r"\.get\(\s*[\"'][^\"']+[\"']\s*,[^)]*\)", text)
        assert not found, f"{path.name}: {found}"
