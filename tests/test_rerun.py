"""Rerunning stages of a finished demo run (copies of the session's `demo_run`).

What Snakemake plans is read from its "Job stats" table (dry runs, `-n`): editing the pooling settings
(`features.region_grid`, `features.slices` for lita, an experiment's `pooling: r2|lita`) reruns the
stage that pools and everything after it, nothing before; `--forcerun <rule> --until <rule>` reruns
exactly one stage; with `features.raw_cache: true` a pooling change re-pools (`pool`) without
re-encoding (`features`).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers import E2E_CONFIG, snakemake

from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore

pytestmark = pytest.mark.slow
SHARDS = 3  # the end-to-end config: 24 volumes, shard_size 8
# the stages before the features; a pooling change must plan none of them
BEFORE_POOLING = {"demo_cohort", "demo_encoder", "demo_llm", "cohort", "segment", "regions", "attributes",
                  "reports"}
AFTER_POOLING = {"train_stage1": 1, "train_stage2": 1, "generate": 1, "evaluate": 1, "ablation_table": 1,
                 "report_samples": 1, "ca_per_class_chart": 1, "all": 1}


def copy_run(demo_run: Path, dest: Path) -> Path:
    shutil.copytree(demo_run, dest, symlinks=True)  # keeps modification times and .snakemake metadata
    return dest


def job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's first "Job stats" table; {} when there is nothing to do."""
    m = re.search(r"Job stats:\njob\s+count\n-+\s+-+\n(.*?)\ntotal\s+(\d+)", output, re.S)
    if m is None:
        assert "Nothing to be done" in output, output[-3000:]
        return {}
    stats = {rule: int(n) for rule, n in re.findall(r"^(\w+)\s+(\d+)\s*$", m.group(1), re.M)}
    assert sum(stats.values()) == int(m.group(2))
    return stats


def run(workdir: Path, *args: str, config: dict | None = None, dry: bool = True) -> tuple[dict[str, int], str]:
    """Snakemake with the end-to-end config (plus `config` merged over it); no target: `all`."""
    files = [str(E2E_CONFIG)]
    if config:
        extra = workdir.parent / f"{workdir.name}-extra-{len(list(workdir.parent.glob('*-extra-*')))}.yaml"
        extra.write_text(yaml.safe_dump(config), encoding="utf-8")
        files.append(str(extra))
    # options only: `--until` takes several values and would swallow a positional target
    proc = snakemake(workdir, "--configfile", *files, *(["-n"] if dry else []), *args)
    out = proc.stdout + proc.stderr
    return job_stats(out), out


@pytest.fixture(scope="module")
def finished(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy for the dry runs (which change nothing)."""
    return copy_run(demo_run, tmp_path_factory.mktemp("rerun") / "wd")


def test_a_finished_run_has_nothing_to_do(finished: Path) -> None:
    assert run(finished)[0] == {}


def test_changing_the_pooling_grid_reruns_pooling_and_everything_after(finished: Path) -> None:
    # r2 pools each region slice to region_grid (h, w); 9 x 6 keeps 6 x 9 x 6 = 324 region tokens
    stats, out = run(finished, config={"features": {"region_grid": [9, 6]}})
    assert stats == {"features": SHARDS, **AFTER_POOLING}
    assert not BEFORE_POOLING & set(stats)
    assert "Rules with provenance triggered jobs: features" in out  # the params changed, nothing else


def test_switching_an_experiment_to_lita_pooling(finished: Path) -> None:
    stats, out = run(finished, config={"experiments": {"full": {"pooling": "lita"}}})
    assert stats == {"features": SHARDS, **AFTER_POOLING}
    assert "results/features/demo-dinov2-lita/shard-0.zarr" in out
    assert "results/features/demo-dinov2-r2/" not in out.split("Job stats")[1]  # r2 stays as it is


def test_lita_only_settings_leave_an_r2_run_alone(finished: Path) -> None:
    # `features.slices` is the s of the lita mode; the demo's experiment pools with r2
    assert run(finished, config={"features": {"slices": 4}})[0] == {}
    stats, _ = run(finished, config={"features": {"slices": 4}, "experiments": {"full": {"pooling": "lita"}}})
    assert stats == {"features": SHARDS, **AFTER_POOLING}


def test_forcerun_until_plans_one_stage_and_R_plans_it_and_what_follows(finished: Path) -> None:
    assert run(finished, "--forcerun", "features", "--until", "features")[0] == {"features": SHARDS}
    assert run(finished, "--forcerun", "regions", "--until", "regions")[0] == {"regions": SHARDS}
    assert run(finished, "-R", "features")[0] == {"features": SHARDS, **AFTER_POOLING}


def test_forcerun_until_reruns_exactly_one_stage(demo_run: Path, tmp_path: Path) -> None:
    wd = copy_run(demo_run, tmp_path / "wd")
    res = wd / "results"
    others = [res / "cohort.parquet", res / "segment" / "shard-1.parquet", res / "reports" / "test.parquet",
              res / "experiments" / "full" / "metrics.json", res / "tables" / "ablation.csv"]
    mtimes = {p: p.stat().st_mtime_ns for p in others}
    before = {k: pd.read_parquet(res / "attributes" / f"shard-{k}.parquet") for k in range(SHARDS)}
    t0 = time.time()
    stats, _ = run(wd, "--forcerun", "attributes", "--until", "attributes", dry=False)
    assert stats == {"attributes": SHARDS}
    for k in range(SHARDS):
        table = res / "attributes" / f"shard-{k}.parquet"
        assert table.stat().st_mtime > t0  # rewritten ...
        pd.testing.assert_frame_equal(pd.read_parquet(table), before[k])  # ... with the same content
    assert {p: p.stat().st_mtime_ns for p in others} == mtimes  # nothing else ran
    # the tables are newer than what was made from them, but Snakemake compares the checksums it
    # recorded for small input files: the same content reruns nothing
    assert run(wd)[0] == {}


def test_raw_cache_repools_without_reencoding(demo_run: Path, tmp_path: Path) -> None:
    wd = copy_run(demo_run, tmp_path / "wd")
    raw = {"features": {"raw_cache": True}}
    # switching the cache on: encode once into the raw-token cache, pool from it
    stats, _ = run(wd, "--until", "pool", config=raw, dry=False)
    assert stats == {"features": SHARDS, "pool": SHARDS}
    # the re-pooled features are those the fused encode+pool job wrote
    fused = FeatureStore(sorted((demo_run / "results" / "features" / "demo-dinov2-r2").glob("shard-*.zarr")))
    pooled = FeatureStore(sorted((wd / "results" / "features" / "demo-dinov2-r2").glob("shard-*.zarr")))
    assert fused.volume_ids == pooled.volume_ids
    for vid in fused.volume_ids[:4]:
        for name in FEATURE_ARRAYS:
            np.testing.assert_allclose(fused[vid][name].astype(np.float32), pooled[vid][name].astype(np.float32),
                                       rtol=1e-2, atol=1e-2, err_msg=f"{vid} {name}")
    # folders (zarr) have no checksum: what follows is out of date by modification time; the features
    # are the same, so mark it up to date (`--touch`) instead of retraining here
    assert run(wd, config=raw)[0] == AFTER_POOLING
    run(wd, "--touch", config=raw, dry=False)
    assert run(wd, config=raw)[0] == {}
    # a pooling change now re-pools every shard and reruns what follows; nothing is re-encoded
    stats, _ = run(wd, config={"features": {"raw_cache": True, "region_grid": [9, 6]}})
    assert stats == {"pool": SHARDS, **AFTER_POOLING}
    assert "features" not in stats and not BEFORE_POOLING & set(stats)
