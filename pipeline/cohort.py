"""Cohort manifest: one row per volume, from a dataset adapter.

`results/cohort.parquet` columns: volume_id, patient_id, split, shard, ct_path, mask_dir, mask_source,
findings, impressions, mask_label_names. `mask_dir` is a folder of per-structure masks or one
multi-label map file; `mask_label_names` is that label map's `id<TAB>name` file ("" for a folder).
Every later stage works shard by shard from this table.

Adapters
- `radgenome` (also used by the demo, which is generated in RadGenome's layout): volumes at
  `<volumes_dir>/<prefix>_<pid>/<prefix>_<pid><scan>/<prefix>_<pid>_<scan>_<recon>.nii.gz`, SAT masks at
  `<masks_dir>/seg_<volume_id>/`, CT-RATE report CSVs (`VolumeName, ..., Findings_EN, Impressions_EN`),
  an optional split CSV (`VolumeName, split`); without it `valid_*` volumes are the test split (as in
  RadGenome / CT-RATE) and `train_*` patients are split into train / validation by a stable hash.
- `manifest` (own data): one CSV / Parquet table, one row per volume, any safe id, explicit splits,
  NIfTI or DICOM CTs, masks as a folder or a label map; read and checked by `pipeline.own_data`, which
  also writes its ground truth (region texts, labels) in the shapes the reports stage reads.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.constants import SPLITS
from pipeline.io import InputError, setup_logging, write_parquet

MANIFEST_COLUMNS: tuple[str, ...] = (
    "volume_id",
    "patient_id",
    "split",
    "shard",
    "ct_path",
    "mask_dir",
    "mask_source",
    "findings",
    "impressions",
    "mask_label_names",
)

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_CTRATE_ID = re.compile(r"^(?P<prefix>[A-Za-z]+)_(?P<pid>\d+)_(?P<scan>[a-z]+)_(?P<recon>\d+)$")


def validate_volume_id(volume_id: str, source: str) -> str:
    """Reject ids that could escape a folder or collide on disk."""
    if not isinstance(volume_id, str) or not _SAFE_ID.match(volume_id) or ".." in volume_id:
        raise InputError(f"{source}: unsafe volume id {volume_id!r} (allowed: letters, digits, _ . -)")
    return volume_id


def radgenome_ct_path(volumes_dir: Path, volume_id: str) -> Path:
    """RadGenome / CT-RATE nested path of a volume id like `train_12_a_1`."""
    m = _CTRATE_ID.match(volume_id)
    if not m:
        raise InputError(f"volume {volume_id}: not a CT-RATE style id (<split>_<patient>_<scan>_<recon>)")
    patient = f"{m['prefix']}_{m['pid']}"
    return volumes_dir / patient / f"{patient}{m['scan']}" / f"{volume_id}.nii.gz"


def patient_of(volume_id: str) -> str:
    m = _CTRATE_ID.match(volume_id)
    return f"{m['prefix']}_{m['pid']}" if m else volume_id


def _stable_fraction(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def read_ctrate_reports(paths: Sequence[Path]) -> pd.DataFrame:
    """Concatenate CT-RATE report CSVs -> volume_id, findings, impressions."""
    frames = []
    for path in paths:
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"{path}: cannot parse report CSV: {exc}") from None
        missing = {"VolumeName", "Findings_EN"} - set(df.columns)
        if missing:
            raise InputError(f"{path}: report CSV lacks columns {sorted(missing)}")
        frames.append(
            pd.DataFrame(
                {
                    "volume_id": df["VolumeName"].str.replace(r"\.nii(\.gz)?$", "", regex=True),
                    "findings": df["Findings_EN"],
                    "impressions": df.get("Impressions_EN", pd.Series([""] * len(df))),
                }
            )
        )
    reports = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["volume_id"])
    dup = reports["volume_id"][reports["volume_id"].duplicated()]
    if len(dup):
        raise InputError(f"report CSVs: duplicated volume ids, e.g. {sorted(set(dup))[:5]}")
    return reports


def build_radgenome_manifest(
    volumes_dir: Path,
    masks_dir: Path,
    reports_csv: Sequence[Path],
    shard_size: int,
    splits_csv: Path | None = None,
    validation_fraction: float = 0.15,
    mask_source: str = "precomputed",
) -> pd.DataFrame:
    reports = read_ctrate_reports(reports_csv)
    for vid in reports["volume_id"]:
        validate_volume_id(vid, "report CSV")
    reports["patient_id"] = reports["volume_id"].map(patient_of)

    if splits_csv is not None:
        try:
            splits = pd.read_csv(splits_csv, dtype=str, keep_default_na=False, encoding="utf-8")
        except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise InputError(f"{splits_csv}: cannot parse split CSV: {exc}") from None
        if not {"VolumeName", "split"} <= set(splits.columns):
            raise InputError(f"{splits_csv}: split CSV needs columns VolumeName, split")
        dup = splits["VolumeName"][splits["VolumeName"].duplicated()]
        if len(dup):
            raise InputError(f"{splits_csv}: volumes listed more than once, e.g. {sorted(set(dup))[:5]}")
        split_of = dict(zip(splits["VolumeName"], splits["split"], strict=True))
        unknown = sorted(set(split_of.values()) - set(SPLITS))
        if unknown:
            raise InputError(f"{splits_csv}: unknown split names {unknown}; use {list(SPLITS)}")
        missing = sorted(set(reports["volume_id"]) - set(split_of))
        if missing:
            raise InputError(f"{splits_csv}: no split for volumes {missing[:5]}")
        reports["split"] = reports["volume_id"].map(split_of)
    else:

        def default_split(pid: str) -> str:
            if pid.startswith("valid_"):
                return "test"
            return "validation" if _stable_fraction(pid) < validation_fraction else "train"

        reports["split"] = reports["patient_id"].map(default_split)

    leaks = reports.groupby("patient_id")["split"].nunique()
    if (leaks > 1).any():
        raise InputError(f"patients in more than one split: {list(leaks[leaks > 1].index[:5])}")

    reports = reports.sort_values("volume_id", kind="stable").reset_index(drop=True)
    reports["ct_path"] = [str(radgenome_ct_path(volumes_dir, v)) for v in reports["volume_id"]]
    reports["mask_dir"] = [str(masks_dir / f"seg_{v}") for v in reports["volume_id"]]
    reports["mask_source"] = mask_source
    reports["mask_label_names"] = ""
    reports["shard"] = reports.index // shard_size
    missing_ct = [v for v, p in zip(reports["volume_id"], reports["ct_path"]) if not Path(p).is_file()]
    if missing_ct:
        raise InputError(f"{len(missing_ct)} volumes have no CT file, e.g. {missing_ct[0]}: "
                         f"{radgenome_ct_path(volumes_dir, missing_ct[0])}")
    return reports[list(MANIFEST_COLUMNS)]


def build_own_manifest(table: Path, shard_size: int, dicom_dir: Path, require_masks: bool = False,
                       truth_dir: Path | None = None) -> pd.DataFrame:
    """The cohort manifest of an own-data table (`pipeline.own_data`); with `truth_dir`, its region texts
    and labels go to `truth_dir/{region_report,labels}.csv` for the reports stage."""
    from pipeline import own_data

    volumes = own_data.read_own_manifest(table, require_masks=require_masks, check_files=True)
    manifest = own_data.cohort_rows(volumes, shard_size, dicom_dir)
    if truth_dir is not None:
        own_data.write_ground_truth(volumes, truth_dir / "region_report.csv", truth_dir / "labels.csv")
    return manifest


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.cohort", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--adapter", choices=["radgenome", "manifest"], default="radgenome",
                    help="radgenome: RadGenome / CT-RATE layout (also the demo's); manifest: the own-data table")
    ap.add_argument("--volumes-dir", type=Path, help="radgenome: the volumes folder")
    ap.add_argument("--masks-dir", type=Path, help="radgenome: the SAT masks folder")
    ap.add_argument("--reports-csv", type=Path, nargs="+", help="radgenome: CT-RATE report CSVs")
    ap.add_argument("--splits-csv", type=Path, help="radgenome: VolumeName, split table (default: by prefix and hash)")
    ap.add_argument("--validation-fraction", type=float, default=0.15,
                    help="radgenome without --splits-csv: share of training patients held out for validation")
    ap.add_argument("--table", type=Path, help="manifest: the own-data table (.csv / .parquet)")
    ap.add_argument("--dicom-dir", type=Path, help="manifest: where DICOM rows were converted (dicom_import)")
    ap.add_argument("--require-masks", action="store_true", help="manifest: every row must give masks")
    ap.add_argument("--truth-dir", type=Path, help="manifest: where region_report.csv and labels.csv go")
    ap.add_argument("--shard-size", type=int, required=True, help="volumes per shard (config shard_size)")
    ap.add_argument("--expect-volumes", type=int, help="volume count the workflow planned its shards for")
    ap.add_argument("--out", type=Path, required=True, help="the cohort manifest (.parquet)")
    args = ap.parse_args(argv)
    log = setup_logging()
    if args.adapter == "manifest":
        if args.table is None or args.dicom_dir is None:
            ap.error("--adapter manifest needs --table and --dicom-dir")
        manifest = build_own_manifest(args.table, args.shard_size, args.dicom_dir, args.require_masks,
                                      args.truth_dir)
        source = str(args.table)
    else:
        if args.volumes_dir is None or args.masks_dir is None or not args.reports_csv:
            ap.error("--adapter radgenome needs --volumes-dir, --masks-dir and --reports-csv")
        manifest = build_radgenome_manifest(
            args.volumes_dir,
            args.masks_dir,
            args.reports_csv,
            args.shard_size,
            args.splits_csv,
            args.validation_fraction,
        )
        source = "the report CSVs"
    if args.expect_volumes is not None and len(manifest) != args.expect_volumes:
        raise InputError(f"the dataset has {len(manifest)} volumes but the workflow planned shards for "
                         f"{args.expect_volumes}: {source} changed while planning; rerun")
    write_parquet(manifest, args.out)
    counts = manifest["split"].value_counts().to_dict()
    log.info("cohort: %d volumes, %d shards, splits %s -> %s",
             len(manifest), manifest["shard"].nunique(), counts, args.out)


if __name__ == "__main__":
    main()
