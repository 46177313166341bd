"""Own data: a cohort described by one table (CSV or Parquet), one row per volume (`dataset.adapter: manifest`).

Columns (see docs/own-data.md):
- required: `volume_id` (letters, digits, `_ . -`; no path separators, no `..`), `patient_id`, `split`
  (`train` / `validation` / `test`), `ct` (a NIfTI file `.nii` / `.nii.gz`, or a folder holding one
  DICOM series), `findings` (report text; may be empty only in the test split);
- optional: `masks` (a folder of per-structure mask files, or one multi-label map `.nii` / `.nii.gz`),
  `mask_label_names` (the label map's `id<TAB>name` file; required with a label map, refused with a
  folder), `impressions`, `dicom_series_uid` (which series of a DICOM folder holding several), the six
  region texts `lung`, `airways`, `mediastinum`, `heart`, `osseous`, `abdomen`, and CT-RATE's 18 label
  columns (all 18 or none; per row all empty, or every one 0 / 1).

Relative paths resolve against the table's folder. A column the table does not know is an error (a
misspelt optional column would otherwise be dropped without a word). Every error names the table,
the row (1-based, and the CSV line) and, where one is involved, the file.

A DICOM row's CT is converted by the `dicom_import` rule (one job per shard holding DICOM rows,
`pipeline.dicom.convert_series`) into `<results>/dicom/shard-<k>/<volume_id>.nii.gz`; the cohort
manifest points there. The reports stage reads the ground truth in the shapes it reads for RadGenome:
`write_ground_truth` writes the region texts as a grounded region CSV (`Volumename, Anatomy,
Sentence`, anatomy = the region's own name) and the labels as a CT-RATE label CSV.

CLI: `python -m pipeline.own_data dicom --table T --shard K --shard-size N --out DIR --qc QC.parquet
[--on-error skip]` (the `dicom_import` rule); `python -m pipeline.own_data example --shared-data DIR
--out DIR` writes an example table over TotalSegmentator's public test files (docs/own-data.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from pipeline.constants import CTRATE_CLASSES, REGIONS, SPLITS
from pipeline.io import InputError, atomic_output, setup_logging, write_parquet

REQUIRED_COLUMNS: tuple[str, ...] = ("volume_id", "patient_id", "split", "ct", "findings")
OPTIONAL_COLUMNS: tuple[str, ...] = ("masks", "mask_label_names", "impressions", "dicom_series_uid",
                                     *REGIONS, *CTRATE_CLASSES)
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABEL_VALUES = {"0": 0, "1": 1, "0.0": 0, "1.0": 1}


@dataclass(frozen=True)
class OwnVolume:
    """One validated table row; paths resolved against the table's folder."""

    row: int  # 0-based data row, in file order
    where: str  # "<table>, row N (line L)" for messages
    volume_id: str
    patient_id: str
    split: str
    ct: Path
    ct_format: str  # nifti | dicom
    masks: Path | None
    mask_label_names: Path | None
    findings: str
    impressions: str = ""
    dicom_series_uid: str | None = None
    region_texts: dict[str, str] = field(default_factory=dict)
    labels: dict[str, int] | None = None


def is_nifti(path: Path | str) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_table(path: Path) -> pd.DataFrame:
    """The table as strings (CSV: UTF-8; Parquet); a missing, unreadable or empty table names the file."""
    if not path.is_file():
        raise InputError(f"{path}: own-data manifest not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # utf-8-sig: a spreadsheet's byte-order mark would otherwise glue itself to the first column name
            df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
        elif suffix == ".parquet":
            df = pd.read_parquet(path)
            df = df.astype(object).where(df.notna(), "").astype(str)
        else:
            raise InputError(f"{path}: an own-data manifest is a .csv or .parquet file")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, OSError, ValueError) as exc:
        raise InputError(f"{path}: cannot read the own-data manifest: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{path}: the manifest lacks columns {missing} (required: {list(REQUIRED_COLUMNS)})")
    unknown = [c for c in df.columns if c not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS]
    if unknown:
        raise InputError(f"{path}: unknown manifest columns {unknown}; known: "
                         f"{list(REQUIRED_COLUMNS + OPTIONAL_COLUMNS)}")
    labels = [c for c in CTRATE_CLASSES if c in df.columns]
    if labels and len(labels) != len(CTRATE_CLASSES):
        raise InputError(f"{path}: label columns must be all 18 CT-RATE classes or none; missing "
                         f"{[c for c in CTRATE_CLASSES if c not in df.columns]}")
    if not len(df):
        raise InputError(f"{path}: the manifest has no rows")
    return df


def _row_labels(raw: dict[str, str], where: str) -> dict[str, int] | None:
    values = {c: str(raw.get(c, "")).strip() for c in CTRATE_CLASSES if c in raw}
    if not values or not any(values.values()):
        return None
    bad = {c: v for c, v in values.items() if v not in LABEL_VALUES}
    if bad:
        raise InputError(f"{where}: labels must be 0 or 1 in every one of the 18 columns (or all empty); "
                         f"got {bad}")
    return {c: LABEL_VALUES[v] for c, v in values.items()}


def _parse_row(raw: dict[str, str], i: int, where: str, base: Path, require_masks: bool,
               check_files: bool) -> OwnVolume:
    from pipeline.cohort import validate_volume_id

    def text(col: str) -> str:
        return str(raw.get(col, "") or "").strip()

    vid = text("volume_id")
    try:
        validate_volume_id(vid, where)
    except InputError as exc:
        raise InputError(f"{exc}; no path separators, no '..'") from None
    where = f"{where} (volume {vid})"
    patient = text("patient_id")
    if not patient:
        raise InputError(f"{where}: empty patient_id")
    split = text("split")
    if split not in SPLITS:
        raise InputError(f"{where}: unknown split {split!r}; use one of {list(SPLITS)}")
    if not text("ct"):
        raise InputError(f"{where}: empty ct (a NIfTI file or a DICOM series folder)")
    ct = base / text("ct")
    ct_format = "nifti" if is_nifti(ct) else "dicom"
    if check_files:
        if ct_format == "nifti" and not ct.is_file():
            raise InputError(f"{where}: CT file not found: {ct}")
        if ct_format == "dicom" and not ct.is_dir():
            kind = "a file, but not NIfTI (.nii / .nii.gz)" if ct.exists() else "not found"
            raise InputError(f"{where}: CT {ct} is {kind}; give a NIfTI file or a DICOM series folder")
    masks = base / text("masks") if text("masks") else None
    label_names = base / text("mask_label_names") if text("mask_label_names") else None
    if masks is None:
        if require_masks:
            raise InputError(f"{where}: empty masks, and segmentation.backend precomputed reads the masks "
                             "given here (a folder of per-structure files, or a label map + mask_label_names)")
        if label_names is not None:
            raise InputError(f"{where}: mask_label_names {label_names} given without masks")
    elif is_nifti(masks):
        if label_names is None:
            raise InputError(f"{where}: masks {masks} is a label map but mask_label_names is empty: give its "
                             "id<TAB>name file (e.g. TotalSegmentator's class map)")
        if check_files and not masks.is_file():
            raise InputError(f"{where}: label map not found: {masks}")
        if check_files and not label_names.is_file():
            raise InputError(f"{where}: label-names file not found: {label_names}")
    else:
        if label_names is not None:
            raise InputError(f"{where}: mask_label_names {label_names} given, but masks {masks} is a folder "
                             "of per-structure files (label names belong to a label-map file)")
        if check_files and not masks.is_dir():
            raise InputError(f"{where}: mask folder not found: {masks}")
    findings = text("findings")
    if not findings and split != "test":
        raise InputError(f"{where}: empty findings in the {split} split (only test volumes may lack a report)")
    uid = text("dicom_series_uid") or None
    if uid is not None and ct_format != "dicom":
        raise InputError(f"{where}: dicom_series_uid given but ct {ct} is a NIfTI file")
    return OwnVolume(row=i, where=where, volume_id=vid, patient_id=patient, split=split, ct=ct,
                     ct_format=ct_format, masks=masks, mask_label_names=label_names, findings=findings,
                     impressions=text("impressions"), dicom_series_uid=uid,
                     region_texts={r: text(r) for r in REGIONS if text(r)}, labels=_row_labels(raw, where))


def csv_row_lines(path: Path) -> list[int]:
    """The file line on which each data row of a CSV starts (a quoted text may span several lines)."""
    import csv

    starts, previous_end = [], 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        for _ in reader:
            starts.append(previous_end + 1)
            previous_end = reader.line_num
    return starts[1:]  # the header is not a data row


def read_own_manifest(path: Path | str, require_masks: bool = False, check_files: bool = True) -> list[OwnVolume]:
    """Every row validated, in volume-id order. `check_files=False` (workflow planning) reads only the table."""
    path = Path(path)
    df = read_table(path)
    base = path.parent
    lines = csv_row_lines(path) if path.suffix.lower() == ".csv" else []
    volumes: list[OwnVolume] = []
    first_row: dict[str, str] = {}
    for i, raw in enumerate(df.to_dict("records")):
        where = f"{path}, row {i + 1}" + (f" (line {lines[i]})" if i < len(lines) else "")
        vol = _parse_row(raw, i, where, base, require_masks, check_files)
        if vol.volume_id in first_row:
            raise InputError(f"{where}: duplicate volume id {vol.volume_id!r}, first on {first_row[vol.volume_id]}")
        first_row[vol.volume_id] = where
        volumes.append(vol)
    split_of: dict[str, OwnVolume] = {}
    for vol in volumes:
        other = split_of.setdefault(vol.patient_id, vol)
        if other.split != vol.split:
            raise InputError(f"{path}: patient {vol.patient_id!r} is in two splits: {other.split} "
                             f"({other.where}) and {vol.split} ({vol.where}); keep a patient in one split")
    return sorted(volumes, key=lambda v: v.volume_id)


def shard_of(volumes: Sequence[OwnVolume], shard_size: int) -> dict[str, int]:
    """volume_id -> shard, as the cohort manifest numbers them (volume-id order, `shard_size` per shard)."""
    return {v.volume_id: i // shard_size for i, v in enumerate(sorted(volumes, key=lambda v: v.volume_id))}


def dicom_shards(volumes: Sequence[OwnVolume], shard_size: int) -> list[int]:
    """The shards that hold at least one DICOM row (one `dicom_import` job each)."""
    shards = shard_of(volumes, shard_size)
    return sorted({shards[v.volume_id] for v in volumes if v.ct_format == "dicom"})


def converted_ct(dicom_dir: Path | str, shard: int, volume_id: str) -> Path:
    """Where the `dicom_import` rule writes a DICOM row's CT as NIfTI."""
    return Path(dicom_dir) / f"shard-{shard}" / f"{volume_id}.nii.gz"


def cohort_rows(volumes: Sequence[OwnVolume], shard_size: int, dicom_dir: Path | str) -> pd.DataFrame:
    """The cohort manifest's rows (pipeline.cohort.MANIFEST_COLUMNS) for the own-data table."""
    from pipeline.cohort import MANIFEST_COLUMNS

    shards = shard_of(volumes, shard_size)
    rows = []
    for v in sorted(volumes, key=lambda v: v.volume_id):
        k = shards[v.volume_id]
        ct = converted_ct(dicom_dir, k, v.volume_id) if v.ct_format == "dicom" else v.ct
        rows.append({"volume_id": v.volume_id, "patient_id": v.patient_id, "split": v.split, "shard": k,
                     "ct_path": str(ct), "mask_dir": str(v.masks) if v.masks is not None else "",
                     "mask_source": "precomputed" if v.masks is not None else "",
                     "findings": v.findings, "impressions": v.impressions,
                     "mask_label_names": str(v.mask_label_names) if v.mask_label_names is not None else ""})
    return pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))


def write_ground_truth(volumes: Sequence[OwnVolume], region_csv: Path, labels_csv: Path) -> tuple[int, int]:
    """Region texts as a grounded region CSV and labels as a CT-RATE label CSV (both always written,
    header only when the table has none); returns (volumes with region texts, volumes with labels)."""
    regions = [{"Volumename": v.volume_id, "Anatomy": r, "Sentence": t}
               for v in volumes for r, t in v.region_texts.items()]
    labels = [{"VolumeName": v.volume_id, **v.labels} for v in volumes if v.labels is not None]
    for df, out in ((pd.DataFrame(regions, columns=["Volumename", "Anatomy", "Sentence"]), region_csv),
                    (pd.DataFrame(labels, columns=["VolumeName", *CTRATE_CLASSES]), labels_csv)):
        with atomic_output(out) as tmp:
            df.to_csv(tmp, index=False, encoding="utf-8")
    return len({r["Volumename"] for r in regions}), len(labels)


def import_dicom_shard(table: Path, shard: int, shard_size: int, out_dir: Path, qc_out: Path,
                       on_error: str = "fail") -> pd.DataFrame:
    """Convert the DICOM rows of one shard into `out_dir/<volume_id>.nii.gz`; QC table of the outcome.

    With `on_error: skip` a series that cannot be converted is recorded (status error) and left out;
    the segment stage then skips the volume, its CT being absent.
    """
    from pipeline.dicom import convert_series

    log = setup_logging()
    volumes = read_own_manifest(table, check_files=False)
    shards = shard_of(volumes, shard_size)
    todo = [v for v in volumes if v.ct_format == "dicom" and shards[v.volume_id] == shard]
    rows = []
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        for n, v in enumerate(todo, 1):
            try:
                info = convert_series(v.ct, tmp / f"{v.volume_id}.nii.gz", v.volume_id, v.dicom_series_uid)
            except InputError as exc:
                err = f"{v.where}: {exc}"
                if on_error != "skip":
                    raise InputError(err) from None
                log.error("%s (skipped)", err)
                rows.append({"volume_id": v.volume_id, "stage": "dicom_import", "status": "error", "error": err})
                continue
            log.info("[%d/%d] %s: %d slices -> %s", n, len(todo), v.volume_id, info["n_slices"],
                     out_dir / f"{v.volume_id}.nii.gz")
            rows.append({"volume_id": v.volume_id, "stage": "dicom_import", "status": "ok", "error": ""})
    qc = pd.DataFrame(rows, columns=["volume_id", "stage", "status", "error"])
    write_parquet(qc, qc_out)
    return qc


# The example cohort: TotalSegmentator's public test files (github.com/wasserth/TotalSegmentator,
# tests/reference_files, Apache-2.0). Two CTs with masks, each listed under more than one id so that
# every split has a volume: the example shows the plumbing; its scores mean nothing.
TS_FINDINGS = ("Abdominal CT with the lung bases in the field of view. The liver, the spleen and both "
               "kidneys are in the upper abdomen.")
AORTA_FINDINGS = ("Contrast-enhanced chest CT crop. The thoracic aorta and the great vessels are opacified. "
                  "The trachea is in the field of view.")
AORTA_REGIONS = {"heart": "The thoracic aorta and the great vessels are opacified.",
                 "airways": "The trachea is in the field of view."}


def write_example(shared_data: Path, out_dir: Path) -> Path:
    """Write `out_dir/cohort.csv` pointing at the shared TotalSegmentator files (nothing is copied), and
    `out_dir/config.yaml`, the override that runs it (results under `out_dir/results`).

    Rows: the TotalSegmentator example CT with its 117-class label map (+ the v2 class-map TSV), and the
    contrast chest crop with its folder of per-structure masks. Paths are written relative to `out_dir`
    when they can be, as a user's table would hold them.
    """
    ts = Path(shared_data) / "totalsegmentator"
    files = {"ts_ct": ts / "example_ct_sm.nii.gz", "ts_seg": ts / "example_seg.nii.gz",
             "ts_names": Path(shared_data) / "label-maps" / "totalsegmentator_v2_total.tsv",
             "aorta_ct": ts / "aorta_report" / "ct_cropped.nii.gz", "aorta_masks": ts / "aorta_report" / "masks"}
    missing = [str(p) for p in files.values() if not p.exists()]
    if missing:
        raise InputError(f"example: shared files not found: {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def rel(p: Path) -> str:
        import os

        return os.path.relpath(p.resolve(), out_dir.resolve())

    ts_row = {"ct": rel(files["ts_ct"]), "masks": rel(files["ts_seg"]), "mask_label_names": rel(files["ts_names"]),
              "findings": TS_FINDINGS}
    aorta_row = {"ct": rel(files["aorta_ct"]), "masks": rel(files["aorta_masks"]), "findings": AORTA_FINDINGS,
                 **AORTA_REGIONS}
    rows = [
        {"volume_id": "ts_abdomen_train", "patient_id": "ts_1", "split": "train", **ts_row},
        {"volume_id": "aorta_chest_train", "patient_id": "aorta_1", "split": "train", **aorta_row},
        {"volume_id": "ts_abdomen_val", "patient_id": "ts_2", "split": "validation", **ts_row},
        {"volume_id": "ts_abdomen_test", "patient_id": "ts_3", "split": "test", **ts_row},
        {"volume_id": "aorta_chest_test", "patient_id": "aorta_2", "split": "test", **aorta_row},
    ]
    columns = ["volume_id", "patient_id", "split", "ct", "masks", "mask_label_names", "findings", *REGIONS]
    table = pd.DataFrame([{c: r.get(c, "") for c in columns} for r in rows], columns=columns)
    path = out_dir / "cohort.csv"
    with atomic_output(path) as tmp:
        table.to_csv(tmp, index=False, encoding="utf-8")
    read_own_manifest(path, require_masks=True)  # what we wrote is a valid table
    config = out_dir / "config.yaml"
    with atomic_output(config) as tmp:
        tmp.write_text("# Written by `python -m pipeline.own_data example`: the example table, its own results folder.\n"
                       + yaml.safe_dump({"results": str(out_dir / "results"),
                                         "dataset": {"adapter": "manifest", "manifest": str(path)}}),
                       encoding="utf-8")
    return path


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.own_data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, help="what to do (COMMAND --help: its options)")
    dc = sub.add_parser("dicom", help="convert the DICOM rows of one shard to NIfTI")
    dc.add_argument("--table", type=Path, required=True, help="the own-data manifest (.csv / .parquet)")
    dc.add_argument("--shard", type=int, required=True,
                    help="which shard's DICOM rows to convert (shards as the cohort manifest numbers them)")
    dc.add_argument("--shard-size", type=int, required=True,
                    help="volumes per shard, in volume-id order (the workflow's shard size)")
    dc.add_argument("--out", type=Path, required=True, help="folder of <volume_id>.nii.gz")
    dc.add_argument("--qc", type=Path, required=True, help="QC table (.parquet) of the shard's DICOM rows: ok, or error and why")
    dc.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a series that cannot be converted: fail the job, or record it and skip the volume "
                         "(default: fail)")
    ex = sub.add_parser("example", help="write an example table over the shared TotalSegmentator files")
    ex.add_argument("--shared-data", type=Path, required=True, help="the folder holding totalsegmentator/, label-maps/")
    ex.add_argument("--out", type=Path, required=True, help="folder for cohort.csv")
    args = ap.parse_args(argv)
    if args.command == "dicom":
        import_dicom_shard(args.table, args.shard, args.shard_size, args.out, args.qc, args.on_error)
    else:
        print(write_example(args.shared_data, args.out))


if __name__ == "__main__":
    main()
