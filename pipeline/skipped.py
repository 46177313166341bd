"""Which volumes a stage skipped (`on_error: skip`), read from the stages' QC tables.

Every data stage writes a QC table per shard (`results/qc/<stage>/shard-<k>.parquet`; the features
stage `results/qc/features/<tag>-<pooling>/shard-<k>.parquet`) with one row per volume it met:
`volume_id`, `stage`, `status` (ok / error / skipped) and `error`. A volume whose status is not `ok` in
any of them is *skipped*: training, generation and scoring leave it out, and `metrics.json` counts it
(`skipped` block). The volume is attributed to the first stage that failed it (status `error`, in the
order the tables are given, which is the pipeline's order); later stages record it as `skipped`.

Only a QC record makes a volume skippable: a volume missing from a cache without one stays an error
where it is read (`model.data`), so data is never dropped silently.

    python -m pipeline.skipped --qc results/qc/segment/shard-*.parquet results/qc/regions/shard-*.parquet ...

prints the skipped volumes and the count per stage.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.io import InputError

QC_REQUIRED = ("volume_id", "stage", "status", "error")
OK = "ok"
FAILED = "error"  # the stage that failed the volume; later stages write "skipped"
MAX_LISTED = 1000  # volume ids listed in metrics.json (all are counted)


@dataclass(frozen=True)
class Skipped:
    """The skipped volumes: id -> (stage that failed it, its message), plus the stages looked at."""

    reasons: dict[str, tuple[str, str]] = field(default_factory=dict)
    stages: tuple[str, ...] = ()

    @property
    def ids(self) -> set[str]:
        return set(self.reasons)

    def __contains__(self, volume_id: object) -> bool:
        return str(volume_id) in self.reasons

    def __len__(self) -> int:
        return len(self.reasons)

    def by_stage(self) -> dict[str, int]:
        """Skipped volumes per stage that failed them; every stage looked at appears, 0 included."""
        counts = {s: 0 for s in self.stages}
        for stage, _ in self.reasons.values():
            counts[stage] = counts.get(stage, 0) + 1
        return counts

    def block(self, split_ids: Iterable[str] | None = None, split: str = "test") -> dict:
        """The `skipped` block of metrics.json: counts per stage, the ids (sorted) and their reasons;
        with `split_ids` (e.g. the test references) also those of them that were skipped."""
        ids = sorted(self.reasons)
        out: dict = {
            "n_volumes": len(ids),
            "by_stage": self.by_stage(),
            "volume_ids": ids[:MAX_LISTED],
            "reasons": {v: f"{self.reasons[v][0]}: {self.reasons[v][1]}" for v in ids[:MAX_LISTED]},
            "note": "volumes a stage skipped under on_error: skip (its QC table says why); left out of "
                    "training, generation and scoring",
        }
        if split_ids is not None:
            hit = sorted(set(map(str, split_ids)) & set(ids))
            out[f"n_{split}_volumes"] = len(hit)
            out[f"{split}_volume_ids"] = hit[:MAX_LISTED]
        return out


def read_qc(path: str | Path) -> pd.DataFrame:
    """One QC table, its required columns checked (an error names the file)."""
    path = Path(path)
    try:
        df = pd.read_parquet(path)
    except FileNotFoundError:
        raise InputError(f"{path}: QC table not found") from None
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        raise InputError(f"{path}: cannot read QC table: {exc}") from None
    missing = [c for c in QC_REQUIRED if c not in df.columns]
    if missing:
        raise InputError(f"{path}: QC table lacks column(s) {missing}")
    bad = df[df["volume_id"].isna() | df["status"].isna()]
    if len(bad):
        raise InputError(f"{path}: row {int(bad.index[0])} has no volume_id or status")
    return df[list(QC_REQUIRED)].astype({"volume_id": str, "stage": str, "status": str}).fillna({"error": ""})


def skipped_volumes(qc_paths: Sequence[str | Path]) -> Skipped:
    """The volumes whose status is not `ok` in any of the QC tables (given in pipeline order)."""
    first_error: dict[str, tuple[str, str]] = {}
    first_other: dict[str, tuple[str, str]] = {}
    stages: list[str] = []
    for path in qc_paths:
        df = read_qc(path)
        for stage in df["stage"]:
            if stage not in stages:
                stages.append(stage)
        for vid, stage, status, error in df.itertuples(index=False):
            if status == OK:
                continue
            target = first_error if status == FAILED else first_other
            target.setdefault(vid, (stage, str(error)))
    reasons = {**first_other, **first_error}  # the failing stage wins over a later "skipped" record
    return Skipped(reasons, tuple(stages))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.skipped", description=__doc__.split("\n\n")[0])
    ap.add_argument("--qc", nargs="+", required=True, type=Path, help="QC tables, in pipeline order")
    args = ap.parse_args(argv)
    print(json.dumps(skipped_volumes(args.qc).block(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
