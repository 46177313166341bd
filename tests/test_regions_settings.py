"""The regions stage's settings: one `--params-json` object parsed into `RegionsSettings` (its defaults
are the schema's: tests/test_config_flow.py checks that for every stage); the old per-setting flags are
gone; a run through the CLI writes what `run_shard` called directly writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import REPO, write_box_masks

from pipeline import regions
from pipeline.regions import RegionsSettings
from pipeline.stage_config import SettingsError, parse_settings

TABLE = REPO / "config" / "regions.yaml"


def test_settings_are_checked() -> None:
    s = parse_settings(RegionsSettings, '{"qc_pictures": 0, "decoder": "zlib", "memory_cap_gb": 2}', section="regions")
    assert s == RegionsSettings(0, "zlib", 2.0) and isinstance(s.memory_cap_gb, float)
    with pytest.raises(SettingsError, match="did you mean 'qc_pictures'"):
        parse_settings(RegionsSettings, '{"qc_picture": 1}', section="regions")
    for bad in ('{"decoder": "gzip"}', '{"qc_pictures": -1}', '{"qc_pictures": 1.5}', '{"memory_cap_gb": "8"}'):
        with pytest.raises(ValueError):
            parse_settings(RegionsSettings, bad, section="regions")


def _inputs(tmp_path: Path) -> list[str]:
    ct = write_box_masks(tmp_path, (6, 10, 12), ["right lung upper lobe", "trachea", "lung nodule"], seed=2,
                         start_max=4, length_max=(4, 8, 9))
    manifest = pd.DataFrame([{"volume_id": "v", "patient_id": "p", "split": "train", "shard": 0, "ct_path": str(ct),
                              "mask_dir": str(tmp_path / "seg"), "mask_source": "precomputed", "findings": "",
                              "impressions": ""}])
    manifest.to_parquet(tmp_path / "manifest.parquet", index=False)
    return ["--manifest", str(tmp_path / "manifest.parquet"), "--shard", "0", "--table", str(TABLE)]


def test_the_cli_takes_params_json_and_refuses_the_old_flags(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _inputs(tmp_path)
    out = ["--out", str(tmp_path / "cli.zarr"), "--qc", str(tmp_path / "cli.parquet"), "--pictures", str(tmp_path / "pics")]
    for old in (["--n-pictures", "1"], ["--decoder", "zlib"], ["--memory-cap-gb", "8"]):
        with pytest.raises(SystemExit) as exit_:
            regions.main([*args, *out, *old])
        assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        regions.main([*args, *out, "--params-json", '{"decoder": "gzip"}'])
    assert exit_.value.code == 2 and "--params-json" in capsys.readouterr().err
    regions.main([*args, *out, "--params-json", json.dumps({"qc_pictures": 0, "decoder": "zlib"}), "--threads", "2"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {"ok": 1}
    qc = regions.run_shard(pd.read_parquet(tmp_path / "manifest.parquet"), 0, regions.LabelTable.load(TABLE),
                           tmp_path / "direct.zarr", tmp_path / "direct.parquet", threads=2, n_pictures=0,
                           decoder="zlib")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "cli.parquet"), qc)
    cli, direct = regions.open_masks(tmp_path / "cli.zarr"), regions.open_masks(tmp_path / "direct.zarr")
    assert dict(cli.attrs) == dict(direct.attrs) and cli.attrs["decoder"] == "zlib"
    assert np.array_equal(regions.read_labels(cli["v"]), regions.read_labels(direct["v"]))
    assert not any((tmp_path / "pics").iterdir())  # qc_pictures 0: an empty pictures folder


def test_python_m_runs_the_package() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "pipeline.regions", "--help"], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert proc.stdout.startswith("usage: python -m pipeline.regions") and "--params-json" in proc.stdout
    assert "--n-pictures" not in proc.stdout and "--decoder" not in proc.stdout
