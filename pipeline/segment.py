"""Segment stage: every volume of a shard gets per-structure masks on its CT grid, from a backend.

Backends (config `segmentation.backend`):
- `precomputed`: the dataset ships masks, validated only: CT readable, 3D, within the memory cap,
  finite; masks present. The manifest's `mask_dir` is either a folder of per-structure files
  (`<name>.nii.gz`: RadGenome-Chest CT's / SAT's names, as the demo, or TotalSegmentator's names, as
  its default output) or one multi-label map file (TotalSegmentator `--ml` output) whose class names
  come from the manifest's `mask_label_names` (an `id<TAB>name` TSV or a JSON {id: name}; the column
  may be absent for folders). The vocabulary is `segmentation.vocabulary` (in `--params-json`), or with
  `auto` the one of the label table that knows most of the names; a volume whose names are mostly
  unknown to it fails (`pipeline.regions.check_known`), naming them.
- `sat`: SAT's raw output for the shard (written by the `sat_inference` rule, SAT's own environment)
  is mapped back onto each CT's grid (`pipeline.sat.map_back`), into `<masks-out>/seg_<volume>/`.
  `--step prepare` writes SAT's input jsonl instead (terms = every RadGenome name the table uses).
- `totalsegmentator`: `TotalSegmentator --ml` per CT (`pipeline.totalseg`), one label map per volume
  `<masks-out>/seg_<volume>.nii.gz`, class names from its class map; mapped by the table's
  `totalsegmentator` vocabulary in the regions stage.

Table `results/segment/shard-<k>.parquet`, one row per volume: `volume_id`, `status` (ok / error),
`error`, `backend`, `mask_path` (folder or label map), `mask_format` (folder / labelmap),
`vocabulary`, `label_names` (JSON id -> name for label maps), `n_structures`, `note`. The regions
stage reads masks from there and skips volumes with status error.
QC `results/qc/segment/shard-<k>.parquet`: volume_id, stage, status, error.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import SimpleITK as sitk

from pipeline.cohort import validate_volume_id
from pipeline.io import (
    InputError,
    check_complete,
    check_finite,
    check_memory,
    image_array,
    read_header_info,
    read_image,
    setup_logging,
    verify_gzip_stream,
    write_parquet,
)
from pipeline.regions import (
    AUTO_VOCABULARY,
    DEFAULT_MEMORY_CAP_GB,
    MASK_SUFFIX,
    LabelTable,
    bytes_per_voxel,
    describe_masks,
)
from pipeline.stage_config import settings_from_cli

BACKENDS = ("precomputed", "sat", "totalsegmentator")
TABLE_COLUMNS = ("volume_id", "status", "error", "backend", "mask_path", "mask_format", "vocabulary",
                 "label_names", "n_structures", "note")
QC_COLUMNS = ("volume_id", "stage", "status", "error")
DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "config" / "regions.yaml"


def _label_names_of(row: object) -> str:
    """The manifest's `mask_label_names` ("" when the column is absent or empty: a mask folder)."""
    value = getattr(row, "mask_label_names", "")
    return "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()


def check_ct(volume_id: str, ct_path: Path, memory_cap_bytes: int | None) -> None:
    """The CT is there, readable, 3D scalar, within the memory cap, complete, and finite."""
    validate_volume_id(volume_id, "manifest")
    if not ct_path.is_file():
        raise InputError(f"volume {volume_id}: CT file not found: {ct_path}")
    reader = read_header_info(ct_path, volume_id)
    if reader.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {ct_path} is {reader.GetDimension()}D, expected a 3D CT")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"volume {volume_id}: {ct_path} has {reader.GetNumberOfComponents()} components per voxel")
    check_memory(reader, ct_path, volume_id, memory_cap_bytes, bytes_per_voxel(2))
    check_complete(ct_path, volume_id)  # .nii.gz stream / .nii length (ITK zero-fills either)
    # The stored values are decoded once: the whole gzip stream, CRC and length checked (ITK decodes
    # bytes corrupted inside a .nii.gz without a word), and float voxels checked for NaN / inf (ITK's
    # NIfTI reader silently turns NaN into 0).
    if check_finite(ct_path, volume_id):
        return
    if ct_path.name.endswith(".gz"):
        verify_gzip_stream(ct_path, volume_id)
    if reader.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        image_array(read_image(ct_path, volume_id), ct_path, volume_id)  # other formats


def _row(volume_id: str, backend: str, **kw: object) -> dict[str, object]:
    row: dict[str, object] = {"volume_id": volume_id, "status": "ok", "error": "", "backend": backend,
                              "mask_path": "", "mask_format": "folder", "vocabulary": "radgenome",
                              "label_names": "", "n_structures": 0, "note": ""}
    row.update(kw)
    return row


def segment_volume(row: object, backend: str, cfg: dict[str, object], masks_out: Path | None,
                   cap: int | None, names_json: str = "", table: LabelTable | None = None,
                   vocabulary: str = AUTO_VOCABULARY) -> dict[str, object]:
    vid, ct_path = str(row.volume_id), Path(str(row.ct_path))  # type: ignore[attr-defined]
    check_ct(vid, ct_path, cap)
    if backend == "precomputed":
        src = describe_masks(vid, Path(str(row.mask_dir)), _label_names_of(row),  # type: ignore[attr-defined]
                             table or LabelTable.load(DEFAULT_TABLE), vocabulary)
        return _row(vid, backend, mask_path=src.mask_path, mask_format=src.mask_format, vocabulary=src.vocabulary,
                    label_names=src.label_names, n_structures=src.n_structures, note=src.note())
    if backend == "sat":
        from pipeline import sat

        assert masks_out is not None
        raw = Path(str(cfg["sat_raw"])) / str(cfg.get("dataset", sat.SAT_DATASET))
        info = sat.map_back(vid, ct_path, raw, masks_out)
        note = (f"SAT crop start {info['crop_start_xyz']} size {info['crop_size_xyz']}, "
                f"alignment correlation {info['correlation']:.3f}")
        return _row(vid, backend, mask_path=str(masks_out / f"seg_{vid}"), n_structures=info["n_structures"],
                    note=note)
    if backend == "totalsegmentator":
        from pipeline import totalseg

        assert masks_out is not None
        out = masks_out / f"seg_{vid}{MASK_SUFFIX}"
        totalseg.run(vid, ct_path, out, str(cfg.get("command") or totalseg.DEFAULT_COMMAND),
                     [str(a) for a in cfg.get("args") or []])  # type: ignore[union-attr]
        return _row(vid, backend, mask_path=str(out), mask_format="labelmap", vocabulary="totalsegmentator",
                    label_names=names_json, n_structures=len(json.loads(names_json)))
    raise ValueError(f"segmentation backend {backend!r} is not one of {BACKENDS}")


def run_shard(manifest: pd.DataFrame, shard: int, backend: str, out: Path, on_error: str = "fail",
              qc_out: Path | None = None, masks_out: Path | None = None, cfg: dict[str, object] | None = None,
              memory_cap_gb: float = DEFAULT_MEMORY_CAP_GB, table: LabelTable | None = None,
              vocabulary: str = AUTO_VOCABULARY) -> pd.DataFrame:
    log = setup_logging()
    if backend not in BACKENDS:
        raise ValueError(f"segmentation backend {backend!r} is not one of {BACKENDS}")
    table = table or LabelTable.load(DEFAULT_TABLE)
    cfg = dict(cfg or {})
    cap = int(memory_cap_gb * 2**30) if memory_cap_gb else None
    names_json = ""
    if backend == "totalsegmentator":
        from pipeline import totalseg

        names_json = json.dumps({str(k): v for k, v in totalseg.class_map(cfg.get("label_names")).items()})  # type: ignore[arg-type]
    if backend != "precomputed":
        if masks_out is None:
            raise ValueError(f"backend {backend} needs --masks-out")
        masks_out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for row in manifest[manifest["shard"] == shard].itertuples(index=False):
        try:
            rows.append(segment_volume(row, backend, cfg, masks_out, cap, names_json, table, vocabulary))
        except InputError as exc:
            if on_error != "skip":
                raise
            log.error("%s (skipped)", exc)
            rows.append(_row(str(row.volume_id), backend, status="error", error=str(exc)))
    table = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    if qc_out is not None:
        qc = table.assign(stage="segment")[list(QC_COLUMNS)]
        write_parquet(qc, qc_out)
    write_parquet(table, out)
    log.info("shard %d: %d volumes, %d ok (%s backend)", shard, len(table), int((table["status"] == "ok").sum()),
             backend)
    return table


def prepare_sat(manifest: pd.DataFrame, shard: int, table: LabelTable, out_jsonl: Path) -> list[str]:
    """SAT's input jsonl for the shard: every RadGenome term the label table maps to a channel."""
    from pipeline import sat

    terms = sorted(table.vocabulary("radgenome").bits)
    rows = manifest[manifest["shard"] == shard]
    for vid in rows["volume_id"]:
        validate_volume_id(str(vid), "manifest")
    sat.write_jsonl(list(rows["ct_path"]), terms, out_jsonl)
    return terms


@dataclass(frozen=True)
class SegmentSettings:
    """The stage's settings: the config's `segmentation` section. `sat` / `totalsegmentator` are the
    backends' own parameters (the schema fills their defaults), passed to the backend as they are."""

    backend: str = "precomputed"
    memory_cap_gb: float = DEFAULT_MEMORY_CAP_GB
    vocabulary: str = AUTO_VOCABULARY
    sat: dict = field(default_factory=dict)
    totalsegmentator: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"segmentation.backend {self.backend!r} is not one of {BACKENDS}")
        object.__setattr__(self, "memory_cap_gb", float(self.memory_cap_gb))  # 8 or 8.0 in the JSON


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.segment", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="the cohort manifest (.parquet)")
    ap.add_argument("--shard", type=int, required=True, help="the shard whose volumes are segmented")
    ap.add_argument("--step", choices=["segment", "prepare"], default="segment",
                    help="prepare: write SAT's input jsonl (--out) and stop")
    ap.add_argument("--out", type=Path, required=True, help="the shard's segment table (.parquet)")
    ap.add_argument("--qc", type=Path, help="per-volume QC table")
    ap.add_argument("--masks-out", type=Path, help="where sat / totalsegmentator masks are written")
    ap.add_argument("--table", type=Path, help="label table (default config/regions.yaml); needed by --step prepare")
    ap.add_argument("--sat-raw", type=Path, nargs="?", default=None,
                    help="sat: the shard's raw SAT output folder (written by the sat_inference rule)")
    ap.add_argument("--params-json", default="{}",
                    help='SegmentSettings as JSON (the `segmentation` section), e.g. \'{"backend": "precomputed"}\'')
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a bad volume stops the job (fail) or is recorded in the QC table (skip)")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, SegmentSettings, args.params_json, section="segmentation")
    manifest = pd.read_parquet(args.manifest)
    if args.step == "prepare":
        if args.table is None:
            ap.error("--step prepare needs --table")
        prepare_sat(manifest, args.shard, LabelTable.load(args.table), args.out)
        return
    backend_cfg = {**getattr(settings, settings.backend, {}), "sat_raw": str(args.sat_raw) if args.sat_raw else None}
    run_shard(manifest, args.shard, settings.backend, args.out, args.on_error, args.qc, args.masks_out,
              backend_cfg, settings.memory_cap_gb, LabelTable.load(args.table or DEFAULT_TABLE),
              settings.vocabulary)


if __name__ == "__main__":
    main()
