"""At 25,000 volumes the DAG has jobs per shard, not per volume, and is planned in well under a minute."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from helpers import REPO

_spec = importlib.util.spec_from_file_location("dag_scale", REPO / "benchmarks" / "dag_scale.py")
dag_scale = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dag_scale)


def test_dry_run_at_25000_volumes_is_per_shard_and_fast(tmp_path: Path) -> None:
    config = dag_scale.write_cohort(tmp_path, 25_000, 250)
    wall, counts = dag_scale.dry_run(tmp_path, config)
    shards = 100
    for rule in ("segment", "regions", "attributes"):
        assert counts[rule] == shards, counts
    assert counts["features"] == shards * 2  # the r2 and lita caches of the five experiments
    assert counts["cohort"] == 1 and counts["reports"] == 1
    assert sum(counts.values()) < 6 * shards  # per shard, never per volume
    assert wall < 60, f"snakemake -n all took {wall:.1f} s"
