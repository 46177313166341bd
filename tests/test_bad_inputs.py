"""The bad-input catalogue: every malformed input the stages handle, and what each gives.

`CATALOGUE` below is the one list. Each row: case id, the stage (and function) that meets the input,
what is wrong with it, the outcome, and a regular expression the message must match. The outcome is
the exception type the stage raises (`InputError` for bad data, `FeatureStoreError` for the feature
cache, `ValueError` for a model checkpoint) or `None` for inputs the stages accept on purpose, with
what they record instead (a QC note, an empty text). Every message names the volume id and / or the
file. `case_<id>` below builds the input in a temporary folder and calls the stage function.

Under `on_error: skip` the stages record such volumes in their QC tables and go on:
`test_workflow_skips_broken_volumes_and_finishes_the_rest` breaks four volumes of a small demo cohort
in different ways and checks the run, the QC / segment tables and the other volumes' outputs.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import struct
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import zarr
from helpers import REPO, snakemake, write_image

from pipeline import attributes, cohort, dicom, regions, reports, segment
from pipeline.feature_store import FeatureStore, FeatureStoreError, write_feature_shard
from pipeline.io import InputError, read_image

V = "train_7_a_1"  # the volume id the cases use
CAP = 8 * 2**30  # the default memory cap (segmentation.memory_cap_gb: 8)

# id, stage: function, what is wrong, outcome, message (regex)
CATALOGUE: list[tuple[str, str, str, type[BaseException] | None, str]] = [
    # -- CT volumes: segment (check_ct), features / regions (read_image, read_ct_grid) --
    ("ct_truncated_gzip", "segment: check_ct", ".nii.gz cut to half its bytes", InputError,
     rf"volume {V}: .*ct\.nii\.gz is truncated or corrupt"),
    ("ct_corrupt_gzip", "segment: check_ct", "bytes flipped inside the deflate stream (length intact)", InputError,
     rf"volume {V}: .*ct\.nii\.gz is (truncated or corrupt|corrupt or longer than its header says)"),
    ("ct_not_gzip", "segment: check_ct", "a text file named .nii.gz", InputError,
     rf"volume {V}: .*ct\.nii\.gz is (not a readable gzip file|truncated or corrupt \(Not a gzipped file)"),
    ("ct_empty_file", "segment: check_ct", "a 0-byte .nii.gz", InputError, rf"volume {V}: .*ct\.nii\.gz"),
    ("ct_truncated_nii", "features: read_image", "uncompressed .nii shorter than its header says", InputError,
     rf"volume {V}: .*ct\.nii is truncated \(\d+ of the \d+ bytes"),
    ("ct_2d", "segment: check_ct", "a 2D image", InputError, rf"volume {V}: .*ct\.nii\.gz is 2D, expected a 3D CT"),
    ("ct_4d", "segment: check_ct", "a 4D image", InputError, rf"volume {V}: .*ct\.nii\.gz is 4D, expected a 3D CT"),
    ("ct_vector", "segment: check_ct", "3 components per voxel (RGB)", InputError,
     rf"volume {V}: .*ct\.nii\.gz has 3 components per voxel"),
    ("ct_vector_features", "features: image_array", "3 components per voxel, read by the features stage",
     InputError, rf"volume {V}: .*ct\.nii\.gz has 3 components per voxel"),
    ("ct_nan", "segment: check_ct", "float32 CT with NaN voxels", InputError,
     rf"volume {V}: .*ct\.nii\.gz contains 3 NaN or inf voxels"),
    ("ct_inf", "segment: check_ct", "float32 CT with an inf voxel", InputError,
     rf"volume {V}: .*ct\.nii\.gz contains 1 NaN or inf voxels"),
    ("ct_header_beyond_cap", "segment: check_ct", "a 2 KB file whose header declares 2000^3 voxels", InputError,
     rf"volume {V}: .*ct\.nii\.gz has 2000x2000x2000 voxels: .* over the memory cap .*refused before reading"),
    ("ct_header_beyond_read_cap", "features: read_image", "header declares 30000x30000x30 voxels", InputError,
     rf"volume {V}: .*ct\.nii\.gz declares 30000x30000x30 voxels .* over the cap .*refused before reading"),
    ("ct_missing_file", "segment: check_ct", "the manifest's CT path does not exist", InputError,
     rf"volume {V}: CT file not found: .*ct\.nii\.gz"),
    ("ct_vox_offset_nan", "regions: read_ct_grid", "vox_offset NaN in the header (was a ValueError)", None,
     r"^read$"),
    ("ct_sform_infinite", "regions: read_ct_grid", "an sform row with inf (SimpleITK looped forever on it)",
     InputError, rf"volume {V}: .*ct\.nii\.gz: its NIfTI header has a non-finite or absurd sform"),
    ("ct_unsafe_id_manifest", "segment: check_ct", "a manifest row with volume id '../x'", InputError,
     r"manifest: unsafe volume id '\.\./x'"),
    # -- masks: regions (merge_volume / merge_labelmap) --
    ("mask_folder_missing", "regions: merge_volume", "seg_<id>/ absent", InputError,
     rf"volume {V}: mask folder not found: .*seg_{V}"),
    ("mask_folder_empty", "regions: merge_volume", "seg_<id>/ holds no .nii.gz", InputError,
     rf"volume {V}: no \.nii\.gz masks in .*seg_{V}"),
    ("mask_not_binary", "regions: merge_volume", "uint8 mask with a voxel = 2 (fast path)", InputError,
     rf"volume {V}: mask .*lung\.nii\.gz has values other than 0 and 1"),
    ("mask_float_not_binary", "regions: merge_volume", "float mask with 0.5", InputError,
     rf"volume {V}: mask .*lung\.nii\.gz has values other than 0 and 1 \(e\.g\. 0\.5\)"),
    ("mask_nan", "regions: merge_volume", "float mask with NaN", InputError,
     rf"volume {V}: mask .*lung\.nii\.gz contains NaN or inf voxels"),
    ("mask_truncated_gzip", "regions: merge_volume", "mask .nii.gz cut short", InputError,
     rf"volume {V}: .*lung\.nii\.gz is truncated"),
    ("mask_4d", "regions: merge_volume", "a 4D mask", InputError, rf"volume {V}: mask .*lung\.nii\.gz is 4D, expected 3D"),
    ("mask_grid_no_overlap", "regions: merge_volume", "mask/CT origin mismatch: 500 mm away", InputError,
     rf"volume {V}: mask .*lung\.nii\.gz does not overlap the CT in physical space"),
    ("mask_grid_other_spacing", "regions: merge_volume", "mask/CT shape + spacing mismatch, same space", None,
     r"^resampled: lung\.nii\.gz$"),
    ("mask_duplicate_structure", "regions: merge_volume", "lung.nii and lung.nii.gz in one folder", InputError,
     rf"volume {V}: structure 'lung' is given twice in .*seg_{V}: lung\.nii and lung\.nii\.gz"),
    ("mask_unknown_name", "regions: merge_volume", "a structure name not in config/regions.yaml", None,
     r"^unknown: made-up organ$"),
    ("labelmap_negative", "regions: merge_labelmap", "a label map with label -3", InputError,
     rf"volume {V}: label map .*labels\.nii\.gz has negative labels"),
    ("labelmap_huge_label", "regions: merge_labelmap", "class id 2^31 + 5 (no 16 GB lookup table)", None,
     r"^unknown: label 2147483653$"),
    ("labelmap_without_names", "segment: describe_masks", "mask_dir is a label map, no mask_label_names", InputError,
     rf"volume {V}: .*labels\.nii\.gz is a label map but no label names file is given"),
    ("masks_mostly_unknown", "segment: describe_masks", "2 of 3 mask names in no vocabulary of the table",
     InputError, rf"volume {V}: 2 of 3 structure names in .*seg_{V} are not in the label table's 'radgenome' "
     r"vocabulary: \['gizzard', 'swim bladder'\]"),
    ("features_grid_mismatch", "features: ShardVolumes", "masks array shape differs from the CT's", InputError,
     rf"volume {V}: CT .*ct\.nii\.gz has shape \(12, 16, 16\), masks \(12, 16, 15\)"),
    # -- cohort: report / split CSVs, ids, files --
    ("id_path_traversal", "cohort: build_radgenome_manifest", "VolumeName '../x'", InputError,
     r"report CSV: unsafe volume id '\.\./x'"),
    ("id_with_slash", "cohort: build_radgenome_manifest", "VolumeName 'train_1_a_1/evil'", InputError,
     r"report CSV: unsafe volume id 'train_1_a_1/evil'"),
    ("id_duplicated", "cohort: build_radgenome_manifest", "one VolumeName twice in reports.csv", InputError,
     rf"report CSVs: duplicated volume ids, e\.g\. \['{V}'\]"),
    ("id_duplicated_across_files", "cohort: build_radgenome_manifest", "the same VolumeName in two CSVs", InputError,
     rf"report CSVs: duplicated volume ids, e\.g\. \['{V}'\]"),
    ("csv_unclosed_quote", "cohort: build_radgenome_manifest", "a row with an unclosed quote", InputError,
     r"reports\.csv: cannot parse report CSV"),
    ("csv_extra_fields", "cohort: build_radgenome_manifest", "a row with more fields than the header", InputError,
     r"reports\.csv: cannot parse report CSV: .*Expected 3 fields"),
    ("csv_missing_column", "cohort: build_radgenome_manifest", "no Findings_EN column", InputError,
     r"reports\.csv: report CSV lacks columns \['Findings_EN'\]"),
    ("csv_empty_file", "cohort: build_radgenome_manifest", "a 0-byte reports.csv (was a traceback)", InputError,
     r"reports\.csv: cannot parse report CSV"),
    ("report_not_utf8", "cohort: build_radgenome_manifest", "Latin-1 report text", InputError,
     r"reports\.csv: cannot parse report CSV: 'utf-8' codec can't decode"),
    ("ct_missing_for_report", "cohort: build_radgenome_manifest", "a report row without its CT file", InputError,
     rf"1 volumes have no CT file, e\.g\. {V}: .*{V}\.nii\.gz"),
    ("split_unknown", "cohort: build_radgenome_manifest", "split 'holdout'", InputError,
     r"splits\.csv: unknown split names \['holdout'\]"),
    ("split_patient_leak", "cohort: build_radgenome_manifest", "one patient in train and test", InputError,
     r"patients in more than one split: \['train_7'\]"),
    ("split_missing_volume", "cohort: build_radgenome_manifest", "a volume without a split", InputError,
     rf"splits\.csv: no split for volumes \['{V}'\]"),
    ("split_duplicated", "cohort: build_radgenome_manifest", "a volume listed twice in splits.csv", InputError,
     rf"splits\.csv: volumes listed more than once, e\.g\. \['{V}'\]"),
    # -- reports stage --
    ("report_empty", "reports: build_reports", "empty Findings_EN, no grounded sentences", None,
     r"^kept: six empty region texts \(keywords\)$"),
    ("region_csv_not_utf8", "reports: build_reports", "Latin-1 region_report.csv (was a traceback)", InputError,
     r"region_report\.csv: cannot parse region report CSV: 'utf-8' codec can't decode"),
    ("region_csv_unknown_anatomy", "reports: build_reports", "an anatomy outside report_regions", InputError,
     r"region_report\.csv: anatomy regions not in report_regions: \['spleen'\]"),
    ("labels_csv_missing_column", "reports: build_reports", "labels.csv without 'Lung nodule'", InputError,
     r"labels\.csv: label CSV lacks columns \['Lung nodule'\]"),
    # -- Zarr stores: attributes (masks), model inputs (features) --
    ("masks_zarr_incomplete", "attributes: run_shard", "masks store without complete / volume_ids", InputError,
     r"shard-0\.zarr: masks store is incomplete"),
    ("masks_zarr_not_zarr", "attributes: run_shard", "a folder with no zarr.json", InputError,
     r"shard-0\.zarr: not a masks store of the regions stage"),
    ("masks_array_without_spacing", "attributes: run_shard", "a volume array without spacing", InputError,
     rf"volume {V}: .*shard-0\.zarr/{V} is not a 3D mask array with a spacing"),
    ("features_zarr_incomplete", "model: FeatureStore", "feature shard with complete = false", FeatureStoreError,
     r"shard-0\.zarr: feature shard is incomplete \(interrupted write\)"),
    ("features_zarr_chunk_missing", "model: FeatureStore", "a volume's chunk file deleted", FeatureStoreError,
     rf"shard-0\.zarr: chunk of volume {V} is missing"),
    ("features_volume_in_two_shards", "model: FeatureStore", "one volume id in two shards", FeatureStoreError,
     rf"shard-1\.zarr: volume {V} is also in another shard"),
    ("features_zarr_foreign", "model: FeatureStore", "a masks store passed as a feature shard", FeatureStoreError,
     r"shard-0\.zarr: not a feature shard"),
    # -- checkpoints --
    ("checkpoint_foreign", "generate: load_own_weights", "safetensors of another network", ValueError,
     r"foreign\.safetensors: missing \['connector\.net\.0\.bias', 'connector\.net\.0\.weight'\]"),
    ("checkpoint_wrong_shape", "generate: load_own_weights", "connector of another width", ValueError,
     r"other\.safetensors: connector\.net\.0\.weight has shape \(8, 5\), network has \(8, 4\)"),
    ("checkpoint_not_safetensors", "generate: load_own_weights", "a torch.save pickle renamed .safetensors",
     ValueError, r"pickled\.safetensors: not a readable safetensors file"),
    # -- DICOM series (pipeline.dicom) --
    ("dicom_duplicate_slice", "dicom: convert_series", "the same slice saved twice", InputError,
     r"volume dcm1: .*(a|b)\.dcm and .*(a|b)\.dcm share a slice position"),
    ("dicom_missing_slice", "dicom: convert_series", "a gap in the slice positions", InputError,
     r"volume dcm1: uneven slice spacing in .*series .*a missing slice\?"),
    ("dicom_two_series", "dicom: convert_series", "two series in one folder", InputError,
     r"volume dcm1: .*series holds 2 series; pick one"),
]


@pytest.mark.parametrize("case_id, stage, what, expected, pattern", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(case_id: str, stage: str, what: str, expected, pattern: str, tmp_path: Path) -> None:
    run = globals()[f"case_{case_id}"](tmp_path)
    if expected is None:
        outcome = run()
        assert re.search(pattern, str(outcome)), f"{case_id}: {outcome!r} does not match {pattern!r}"
        return
    with pytest.raises(expected) as info:
        run()
    assert type(info.value) is expected or expected is InputError and isinstance(info.value, InputError)
    message = str(info.value)
    assert re.search(pattern, message, re.S), f"{case_id}: {message!r} does not match {pattern!r}"
    assert "Traceback" not in message


PER_VOLUME = [c for c in CATALOGUE if c[1] in ("segment: check_ct", "regions: merge_volume") and c[3] is InputError]


@pytest.mark.parametrize("case_id, stage, what, expected, pattern", PER_VOLUME, ids=[c[0] for c in PER_VOLUME])
def test_bad_volume_is_a_qc_entry_under_skip(case_id: str, stage: str, what: str, expected, pattern: str,
                                             tmp_path: Path) -> None:
    """Per-volume cases of the segment and regions stages: under `on_error: skip` the shard finishes,
    the bad volume's QC row carries the same message, the good volume next to it is ok."""
    run = globals()[f"case_{case_id}"](tmp_path)
    assert isinstance(run, StageCall) and run.shard is not None
    work = tmp_path / "shard"
    qc = run.shard(work).set_index("volume_id")
    assert qc.loc[GOOD, "status"] == "ok"
    row = qc.loc[run.volume_id]
    assert row["status"] == "error" and re.search(pattern, row["error"], re.S), row.to_dict()


def test_catalogue_is_complete() -> None:
    ids = [c[0] for c in CATALOGUE]
    assert len(ids) == len(set(ids)) and len(ids) >= 20 and len(PER_VOLUME) >= 15
    missing = [i for i in ids if f"case_{i}" not in globals()]
    assert not missing, missing


# ---- helpers --------------------------------------------------------------------------------------

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
SHAPE = (12, 16, 16)


def _hu(shape=SHAPE, dtype=np.int16, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(dtype)


def _ct(tmp: Path, array: np.ndarray | None = None, name: str = "ct.nii.gz", **geom) -> Path:
    return write_image(tmp / name, _hu() if array is None else array, **geom)


def _sitk_write(path: Path, image: sitk.Image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"))
    return path


def _lung(shape=SHAPE, dtype=np.uint8) -> np.ndarray:
    m = np.zeros(shape, dtype)
    m[3:9, 4:12, 2:8] = 1
    return m


def _mask_dir(tmp: Path, masks: dict[str, np.ndarray] | None = None, **geom) -> Path:
    folder = tmp / "masks" / f"seg_{V}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in (masks if masks is not None else {"lung": _lung()}).items():
        write_image(folder / f"{name}.nii.gz", array, **geom)
    return folder


def _header_mutated(path: Path, out: Path, fields: dict[int, tuple[str, float]]) -> Path:
    raw = bytearray(gzip.decompress(path.read_bytes()))
    for offset, (fmt, value) in fields.items():
        struct.pack_into("<" + fmt, raw, offset, value)
    out.write_bytes(gzip.compress(bytes(raw)) if out.name.endswith(".gz") else bytes(raw))
    return out


class StageCall:
    """A case's stage call; `shard(tmp)` runs the stage's whole shard (the bad volume and a good one)
    under `on_error: skip` and returns its QC table."""

    def __init__(self, call: Callable[[], object], shard: Callable[[Path], pd.DataFrame] | None = None,
                 volume_id: str = V) -> None:
        self.call, self.shard, self.volume_id = call, shard, volume_id

    def __call__(self) -> object:
        return self.call()


GOOD = "train_9_a_1"  # the good volume next to the bad one in the skip-mode shards


def _good_volume(tmp: Path) -> tuple[Path, Path]:
    ct = write_image(tmp / "good" / "ct.nii.gz", _hu(seed=3))
    folder = tmp / "good" / f"seg_{GOOD}"
    write_image(folder / "lung.nii.gz", _lung())
    return ct, folder


def _manifest(rows: list[tuple[str, Path, Path]]) -> pd.DataFrame:
    return pd.DataFrame({"volume_id": [r[0] for r in rows], "ct_path": [str(r[1]) for r in rows],
                         "mask_dir": [str(r[2]) for r in rows], "shard": 0})


def _check_ct(tmp: Path, ct: Path, volume_id: str = V) -> StageCall:
    def shard(work: Path) -> pd.DataFrame:
        good_ct, good_masks = _good_volume(work)
        manifest = _manifest([(volume_id, ct, tmp / "no-masks"), (GOOD, good_ct, good_masks)])
        segment.run_shard(manifest, 0, "precomputed", work / "segment.parquet", "skip", work / "qc.parquet")
        return pd.read_parquet(work / "qc.parquet")

    return StageCall(lambda: segment.check_ct(volume_id, ct, CAP), shard, volume_id)


def _merge(tmp: Path, mask_dir: Path | None = None, ct: Path | None = None) -> StageCall:
    ct = ct or _ct(tmp)
    folder = mask_dir if mask_dir is not None else tmp / "masks" / f"seg_{V}"

    def shard(work: Path) -> pd.DataFrame:
        good_ct, good_masks = _good_volume(work)
        manifest = _manifest([(V, ct, folder), (GOOD, good_ct, good_masks)])
        regions.run_shard(manifest, 0, TABLE, work / "masks.zarr", work / "qc.parquet", on_error="skip")
        assert zarr.open_group(str(work / "masks.zarr"), mode="r").attrs["volume_ids"] == [GOOD]
        return pd.read_parquet(work / "qc.parquet")

    return StageCall(lambda: regions.merge_volume(V, ct, folder, TABLE), shard)


# ---- CT cases -------------------------------------------------------------------------------------


def case_ct_truncated_gzip(tmp: Path):
    ct = _ct(tmp)
    ct.write_bytes(ct.read_bytes()[: ct.stat().st_size // 2])
    return _check_ct(tmp, ct)


def case_ct_corrupt_gzip(tmp: Path):
    ct = _ct(tmp, _hu((40, 64, 64)))
    data = bytearray(ct.read_bytes())
    for k in range(len(data) // 2, len(data) // 2 + 16):
        data[k] ^= 0x5A
    ct.write_bytes(bytes(data))
    return _check_ct(tmp, ct)


def case_ct_not_gzip(tmp: Path):
    ct = tmp / "ct.nii.gz"
    ct.write_text("this is not a CT volume\n" * 40, encoding="utf-8")
    return _check_ct(tmp, ct)


def case_ct_empty_file(tmp: Path):
    ct = tmp / "ct.nii.gz"
    ct.write_bytes(b"")
    return _check_ct(tmp, ct)


def case_ct_truncated_nii(tmp: Path):
    ct = _ct(tmp, name="ct.nii")
    ct.write_bytes(ct.read_bytes()[:-500])
    return lambda: read_image(ct, V)


def case_ct_2d(tmp: Path):
    ct = _sitk_write(tmp / "ct.nii.gz", sitk.GetImageFromArray(_hu((16, 16))))
    return _check_ct(tmp, ct)


def _4d(array: np.ndarray) -> sitk.Image:
    return sitk.JoinSeries([sitk.GetImageFromArray(a) for a in array])


def case_ct_4d(tmp: Path):
    ct = _sitk_write(tmp / "ct.nii.gz", _4d(_hu((2, 4, 8, 8))))
    return _check_ct(tmp, ct)


def _rgb_ct(tmp: Path) -> Path:
    return _sitk_write(tmp / "ct.nii.gz", sitk.GetImageFromArray(_hu((4, 8, 8, 3), np.uint8), isVector=True))


def case_ct_vector(tmp: Path):
    ct = _rgb_ct(tmp)
    return _check_ct(tmp, ct)


def case_ct_vector_features(tmp: Path):
    from pipeline.io import image_array

    ct = _rgb_ct(tmp)
    return lambda: image_array(read_image(ct, V), ct, V)


def case_ct_nan(tmp: Path):
    a = _hu(dtype=np.float32)
    a[1, 2, 3] = a[4, 5, 6] = a[7, 8, 9] = np.nan
    ct = _ct(tmp, a)
    return _check_ct(tmp, ct)


def case_ct_inf(tmp: Path):
    a = _hu(dtype=np.float32)
    a[0, 0, 0] = np.inf
    ct = _ct(tmp, a)
    return _check_ct(tmp, ct)


def case_ct_header_beyond_cap(tmp: Path):
    small = _ct(tmp, name="small.nii.gz")
    ct = _header_mutated(small, tmp / "ct.nii.gz", {42: ("h", 2000), 44: ("h", 2000), 46: ("h", 2000)})
    return _check_ct(tmp, ct)


def case_ct_header_beyond_read_cap(tmp: Path):
    small = _ct(tmp, name="small.nii.gz")
    ct = _header_mutated(small, tmp / "ct.nii.gz", {42: ("h", 30000), 44: ("h", 30000), 46: ("h", 30)})
    return lambda: read_image(ct, V)


def case_ct_missing_file(tmp: Path):
    return _check_ct(tmp, tmp / "volumes" / "ct.nii.gz")


def case_ct_vox_offset_nan(tmp: Path):
    ct = _header_mutated(_ct(tmp, name="ok.nii.gz"), tmp / "ct.nii.gz", {108: ("f", float("nan"))})

    def run() -> str:
        grid = regions.read_ct_grid(ct, V, CAP)
        assert grid.size == SHAPE[::-1] and grid.nifti_key is None  # not the fast path: SimpleITK decides
        return "read"

    return run


def case_ct_sform_infinite(tmp: Path):
    # srow_z = (352, 0, 2.5, inf) with sform_code 1: SimpleITK's NIfTI reader never returned (fuzzing found it)
    ct = _header_mutated(_ct(tmp, name="ok.nii.gz"), tmp / "ct.nii.gz",
                         {254: ("h", 1), 312: ("f", 352.0), 316: ("f", 0.0), 320: ("f", 2.5), 324: ("f", float("inf"))})
    return lambda: regions.read_ct_grid(ct, V, CAP)


def case_ct_unsafe_id_manifest(tmp: Path):
    ct = _ct(tmp)
    return _check_ct(tmp, ct, "../x")


# ---- mask cases -----------------------------------------------------------------------------------


def case_mask_folder_missing(tmp: Path):
    return _merge(tmp)


def case_mask_folder_empty(tmp: Path):
    (tmp / "masks" / f"seg_{V}").mkdir(parents=True)
    (tmp / "masks" / f"seg_{V}" / "notes.txt").write_text("no masks here\n", encoding="utf-8")
    return _merge(tmp)


def case_mask_not_binary(tmp: Path):
    m = _lung()
    m[5, 5, 5] = 2
    return _merge(tmp, _mask_dir(tmp, {"lung": m}))


def case_mask_float_not_binary(tmp: Path):
    m = _lung(dtype=np.float32)
    m[5, 5, 5] = 0.5
    return _merge(tmp, _mask_dir(tmp, {"lung": m}))


def case_mask_nan(tmp: Path):
    m = _lung(dtype=np.float32)
    m[0, 0, 0] = np.nan
    return _merge(tmp, _mask_dir(tmp, {"lung": m}))


def case_mask_truncated_gzip(tmp: Path):
    folder = _mask_dir(tmp, {"lung": np.random.default_rng(1).integers(0, 2, SHAPE).astype(np.uint8)})
    f = folder / "lung.nii.gz"
    f.write_bytes(f.read_bytes()[:-200])
    return _merge(tmp, folder)


def case_mask_4d(tmp: Path):
    folder = tmp / "masks" / f"seg_{V}"
    _sitk_write(folder / "lung.nii.gz", _4d(np.zeros((2, *SHAPE), np.uint8)))
    return _merge(tmp, folder)


def case_mask_grid_no_overlap(tmp: Path):
    return _merge(tmp, _mask_dir(tmp, origin=(500.0, 500.0, 500.0)))


def case_mask_grid_other_spacing(tmp: Path):
    # the same physical box (16 x 16 x 36 mm) on a 2x finer grid in x and y
    fine = np.repeat(np.repeat(_lung(), 2, axis=1), 2, axis=2)
    run = _merge(tmp, _mask_dir(tmp, {"lung": fine}, spacing=(0.5, 0.5, 3.0), origin=(-0.25, -0.25, 0.0)))

    def outcome() -> str:
        vm = run()
        assert regions.unpack_channel(vm.labels, "lung").sum() == _lung().sum()
        return "resampled: " + ", ".join(vm.resampled)

    return outcome


def case_mask_duplicate_structure(tmp: Path):
    folder = _mask_dir(tmp)
    write_image(folder / "lung.nii", _lung())
    return _merge(tmp, folder)


def case_mask_unknown_name(tmp: Path):
    run = _merge(tmp, _mask_dir(tmp, {"lung": _lung(), "made-up organ": _lung()}))
    return lambda: "unknown: " + ", ".join(run().unknown)


def _labelmap(tmp: Path, labels: np.ndarray) -> Callable[[], object]:
    ct = _ct(tmp)
    lm = write_image(tmp / "labels.nii.gz", labels)
    return lambda: regions.merge_labelmap(V, ct, lm, {1: "liver"}, TABLE)


def case_labelmap_negative(tmp: Path):
    a = np.zeros(SHAPE, np.int16)
    a[2, 2, 2] = -3
    return _labelmap(tmp, a)


def case_labelmap_without_names(tmp: Path):
    lm = write_image(tmp / "labels.nii.gz", _lung())
    return lambda: regions.describe_masks(V, lm, "", TABLE)


def case_masks_mostly_unknown(tmp: Path):
    folder = _mask_dir(tmp, {"lung": _lung(), "gizzard": _lung(), "swim bladder": _lung()})
    return lambda: regions.describe_masks(V, folder, None, TABLE)


def case_labelmap_huge_label(tmp: Path):
    a = np.zeros(SHAPE, np.uint32)
    a[2, 2, 2] = 2**31 + 5
    a[3, 3, 3] = 1
    run = _labelmap(tmp, a)

    def outcome() -> str:
        vm = run()
        assert regions.unpack_channel(vm.labels, "liver").sum() == 1
        return "unknown: " + ", ".join(vm.unknown)

    return outcome


def case_features_grid_mismatch(tmp: Path):
    from pipeline.features.config import FeatureConfig
    from pipeline.features.stage import ShardVolumes

    ct = _ct(tmp)
    store = zarr.open_group(str(tmp / "shard-0.zarr"), mode="w", zarr_format=3)
    store.create_array(V, data=np.zeros((12, 16, 15), np.uint32))
    store.attrs.update({"volume_ids": [V], "complete": True})
    dataset = ShardVolumes([(V, str(ct))], str(tmp / "shard-0.zarr"), FeatureConfig(), 14)

    def run() -> None:
        _, result = dataset[0]
        if isinstance(result, Exception):
            raise result

    return run


# ---- cohort cases ---------------------------------------------------------------------------------


def _cohort(tmp: Path, rows: list[tuple[str, str]] | None = None, raw: bytes | None = None,
            splits: list[tuple[str, str]] | None = None, extra_csv: list[tuple[str, str]] | None = None,
            ct_for: list[str] | None = None) -> Callable[[], object]:
    """A RadGenome-layout dataset: volumes/, masks/, reports.csv (rows or raw bytes), splits.csv."""
    rows = rows if rows is not None else [(V, "Normal lungs."), ("train_8_a_1", "Small nodule.")]
    for vid in ct_for if ct_for is not None else [r[0] for r in rows if ".." not in r[0] and "/" not in r[0]]:
        path = cohort.radgenome_ct_path(tmp / "volumes", vid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    csvs = [tmp / "reports.csv"]
    if raw is not None:
        csvs[0].write_bytes(raw)
    else:
        pd.DataFrame({"VolumeName": [r[0] for r in rows], "Findings_EN": [r[1] for r in rows],
                      "Impressions_EN": ""}).to_csv(csvs[0], index=False)
    if extra_csv:
        csvs.append(tmp / "reports_valid.csv")
        pd.DataFrame({"VolumeName": [r[0] for r in extra_csv], "Findings_EN": [r[1] for r in extra_csv]}).to_csv(
            csvs[1], index=False)
    split_csv = None
    if splits is not None:
        split_csv = tmp / "splits.csv"
        pd.DataFrame({"VolumeName": [s[0] for s in splits], "split": [s[1] for s in splits]}).to_csv(split_csv,
                                                                                                     index=False)
    return lambda: cohort.build_radgenome_manifest(tmp / "volumes", tmp / "masks", csvs, 8, split_csv)


def case_id_path_traversal(tmp: Path):
    return _cohort(tmp, [(V, "a"), ("../x", "b")])


def case_id_with_slash(tmp: Path):
    return _cohort(tmp, [(V, "a"), ("train_1_a_1/evil", "b")])


def case_id_duplicated(tmp: Path):
    return _cohort(tmp, [(V, "a"), ("train_8_a_1", "b"), (V, "c")])


def case_id_duplicated_across_files(tmp: Path):
    return _cohort(tmp, [(V, "a")], extra_csv=[(V, "again")])


def case_csv_unclosed_quote(tmp: Path):
    raw = f'VolumeName,Findings_EN,Impressions_EN\n{V},"Normal lungs.,ok\ntrain_8_a_1,x,y\n'.encode()
    return _cohort(tmp, raw=raw, ct_for=[V, "train_8_a_1"])


def case_csv_extra_fields(tmp: Path):
    raw = f"VolumeName,Findings_EN,Impressions_EN\n{V},Normal,ok\ntrain_8_a_1,x,y,z,w\n".encode()
    return _cohort(tmp, raw=raw, ct_for=[V, "train_8_a_1"])


def case_csv_missing_column(tmp: Path):
    raw = f"VolumeName,Impressions_EN\n{V},ok\n".encode()
    return _cohort(tmp, raw=raw, ct_for=[V])


def case_csv_empty_file(tmp: Path):
    return _cohort(tmp, raw=b"", ct_for=[V])


def case_report_not_utf8(tmp: Path):
    raw = f"VolumeName,Findings_EN,Impressions_EN\n{V},Herzgr\u00f6\u00dfe normal.,ok\n".encode("latin-1")
    return _cohort(tmp, raw=raw, ct_for=[V])


def case_ct_missing_for_report(tmp: Path):
    return _cohort(tmp, ct_for=["train_8_a_1"])


def case_split_unknown(tmp: Path):
    return _cohort(tmp, splits=[(V, "train"), ("train_8_a_1", "holdout")])


def case_split_patient_leak(tmp: Path):
    rows = [(V, "a"), ("train_7_b_1", "b")]
    return _cohort(tmp, rows, splits=[(V, "train"), ("train_7_b_1", "test")])


def case_split_missing_volume(tmp: Path):
    return _cohort(tmp, splits=[("train_8_a_1", "train")])


def case_split_duplicated(tmp: Path):
    return _cohort(tmp, splits=[(V, "train"), ("train_8_a_1", "train"), (V, "test")])


# ---- reports cases --------------------------------------------------------------------------------


def _reports(tmp: Path, findings: str = "Normal lungs.", region_rows: bytes | None = None,
             labels: pd.DataFrame | None = None) -> Callable[[], pd.DataFrame]:
    from pipeline.constants import CTRATE_CLASSES

    manifest = pd.DataFrame({"volume_id": [V], "patient_id": ["train_7"], "split": ["train"],
                             "findings": [findings], "impressions": [""]})
    region_csv = tmp / "region_report.csv"
    region_csv.write_bytes(region_rows if region_rows is not None else b"Volumename,Anatomy,Sentence\n")
    labels_csv = tmp / "labels.csv"
    (labels if labels is not None else pd.DataFrame({"VolumeName": [V], **{c: [0] for c in CTRATE_CLASSES}})).to_csv(
        labels_csv, index=False)
    return lambda: reports.build_reports(manifest, [region_csv], [labels_csv], REPO / "config" / "regions.yaml")


def case_report_empty(tmp: Path):
    from pipeline.constants import REGIONS

    run = _reports(tmp, findings="")

    def outcome() -> str:
        row = run().iloc[0]
        empty = all(row[r] == "" for r in REGIONS)
        return f"kept: six {'empty' if empty else 'non-empty'} region texts ({row['region_source']})"

    return outcome


def case_region_csv_not_utf8(tmp: Path):
    return _reports(tmp, region_rows=f"Volumename,Anatomy,Sentence\n{V},lung,Gr\u00f6\u00dfe normal.\n".encode("latin-1"))


def case_region_csv_unknown_anatomy(tmp: Path):
    return _reports(tmp, region_rows=f"Volumename,Anatomy,Sentence\n{V},spleen,Normal spleen.\n".encode())


def case_labels_csv_missing_column(tmp: Path):
    from pipeline.constants import CTRATE_CLASSES

    labels = pd.DataFrame({"VolumeName": [V], **{c: [0] for c in CTRATE_CLASSES if c != "Lung nodule"}})
    return _reports(tmp, labels=labels)


# ---- Zarr cases -----------------------------------------------------------------------------------


def _masks_store(tmp: Path, attrs: dict | None = None, spacing: bool = True) -> Path:
    path = tmp / "masks" / "shard-0.zarr"
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    arr = group.create_array(V, data=np.zeros(SHAPE, np.uint32))
    if spacing:
        arr.attrs["spacing"] = [1.0, 1.0, 3.0]
    group.attrs.update(attrs if attrs is not None else {"volume_ids": [V], "complete": True})
    return path


def case_masks_zarr_incomplete(tmp: Path):
    path = _masks_store(tmp, attrs={"channels": []})
    return lambda: attributes.run_shard(path, tmp / "a.parquet")


def case_masks_zarr_not_zarr(tmp: Path):
    path = tmp / "masks" / "shard-0.zarr"
    path.mkdir(parents=True)
    (path / "lung.npy").write_bytes(b"\x93NUMPY")
    return lambda: attributes.run_shard(path, tmp / "a.parquet")


def case_masks_array_without_spacing(tmp: Path):
    path = _masks_store(tmp, spacing=False)
    return lambda: attributes.run_shard(path, tmp / "a.parquet")


def _feature_shard(path: Path, ids: list[str]) -> Path:
    from pipeline.feature_store import FEATURE_ARRAYS

    shapes = {"global": (4, 8), "region": (6, 8), "mask_pooled": (3, 2, 8), "mask_grid": (3, 2, 4, 4),
              "region_slices": (6,), "mask_present": (3,)}
    arrays = {n: np.zeros((len(ids), *shapes[n]), np.float32) for n in FEATURE_ARRAYS}
    write_feature_shard(path, ids, arrays, {"encoder": "demo", "hidden_size": 8})
    return path


def case_features_zarr_incomplete(tmp: Path):
    path = _feature_shard(tmp / "shard-0.zarr", [V])
    meta = json.loads((path / "zarr.json").read_text(encoding="utf-8"))
    meta["attributes"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta), encoding="utf-8")
    return lambda: FeatureStore([path])[V]


def case_features_zarr_chunk_missing(tmp: Path):
    path = _feature_shard(tmp / "shard-0.zarr", ["train_1_a_1", V])
    chunks = sorted(p for p in (path / "packed").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[-1].unlink()  # row 1: V
    return lambda: FeatureStore([path])[V]


def case_features_volume_in_two_shards(tmp: Path):
    a = _feature_shard(tmp / "shard-0.zarr", ["train_1_a_1", V])
    b = _feature_shard(tmp / "shard-1.zarr", [V])
    return lambda: FeatureStore([a, b])


def case_features_zarr_foreign(tmp: Path):
    path = _masks_store(tmp)
    return lambda: FeatureStore([path])[V]


# ---- checkpoint cases -----------------------------------------------------------------------------


class _Net:
    """The part of MedRegionCT `load_own_weights` uses: a module with a 4 -> 8 linear connector."""

    @staticmethod
    def make():
        import torch

        class Connector(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = torch.nn.Sequential(torch.nn.Linear(4, 8))

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.connector = Connector()

        return Net()


def case_checkpoint_foreign(tmp: Path):
    import torch
    from safetensors.torch import save_file

    from model.network import MedRegionCT

    path = tmp / "foreign.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(3, 3), "lm_head.weight": torch.zeros(5, 3)}, str(path))
    return lambda: MedRegionCT.load_own_weights(_Net.make(), path)


def case_checkpoint_wrong_shape(tmp: Path):
    import torch
    from safetensors.torch import save_file

    from model.network import MedRegionCT

    path = tmp / "other.safetensors"
    save_file({"connector.net.0.weight": torch.zeros(8, 5), "connector.net.0.bias": torch.zeros(8)}, str(path))
    return lambda: MedRegionCT.load_own_weights(_Net.make(), path)


def case_checkpoint_not_safetensors(tmp: Path):
    import io

    import torch

    from model.network import MedRegionCT

    path = tmp / "pickled.safetensors"
    buf = io.BytesIO()
    torch.save({"connector.net.0.weight": torch.zeros(8, 4)}, buf)
    path.write_bytes(buf.getvalue())
    return lambda: MedRegionCT.load_own_weights(_Net.make(), path)


# ---- DICOM cases ----------------------------------------------------------------------------------


def _dicom(folder: Path, positions: list[float], names: list[str], series: str = "1.2.3.4.5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (z, name) in enumerate(zip(positions, names)):
        sl = sitk.GetImageFromArray(_hu((1, 8, 8), seed=k))
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0008|0018": f"{series}.{k}",
                           "0020|0032": f"0\\0\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|0030": "0.7\\0.7"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(sl)
    return folder


def case_dicom_duplicate_slice(tmp: Path):
    folder = _dicom(tmp / "series", [0.0, 2.0, 4.0], ["a.dcm", "c.dcm", "d.dcm"])
    shutil.copy(folder / "a.dcm", folder / "b.dcm")
    return lambda: dicom.convert_series(folder, tmp / "out.nii.gz", "dcm1")


def case_dicom_missing_slice(tmp: Path):
    folder = _dicom(tmp / "series", [0.0, 2.0, 4.0, 8.0], ["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    return lambda: dicom.convert_series(folder, tmp / "out.nii.gz", "dcm1")


def case_dicom_two_series(tmp: Path):
    folder = _dicom(tmp / "series", [0.0, 2.0], ["a.dcm", "b.dcm"], series="1.2.3.9")
    _dicom(folder, [0.0, 2.0], ["c.dcm", "d.dcm"], series="1.2.3.8")
    return lambda: dicom.convert_series(folder, tmp / "out.nii.gz", "dcm1")


# ---- the workflow under on_error: skip ------------------------------------------------------------

SKIP_CONFIG = """\
results: results
on_error: skip
shard_size: 4
dataset:
  adapter: demo
  demo: {n_cases: 8, seed: 5}
regions: {threads: 1, qc_pictures: 1}
features: {threads: 1}
"""


def _snakemake(workdir: Path, *targets: str) -> subprocess.CompletedProcess[str]:
    return snakemake(workdir, *targets, check=False, timeout=1200, configfiles=[workdir / "config.yaml"])


@pytest.mark.slow
def test_workflow_skips_broken_volumes_and_finishes_the_rest(tmp_path: Path) -> None:
    """Four volumes broken four ways; `on_error: skip`: the run ends, each is in a QC table, the rest go on."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.yaml").write_text(SKIP_CONFIG, encoding="utf-8")
    t0 = time.perf_counter()
    proc = _snakemake(workdir, "results/cohort.parquet")
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = workdir / "results"
    manifest = pd.read_parquet(res / "cohort.parquet")
    ids = list(manifest["volume_id"])

    def ct_of(vid: str) -> Path:
        p = Path(manifest.set_index("volume_id").loc[vid, "ct_path"])
        return p if p.is_absolute() else workdir / p

    def masks_of(vid: str) -> Path:
        p = Path(manifest.set_index("volume_id").loc[vid, "mask_dir"])
        return p if p.is_absolute() else workdir / p

    # shard 0: a truncated CT and a mask with a value 2; shard 1: NaN voxels and no mask folder
    s0 = list(manifest.loc[manifest["shard"] == 0, "volume_id"])
    s1 = list(manifest.loc[manifest["shard"] == 1, "volume_id"])
    truncated, bad_mask, nan_ct, no_masks = s0[0], s0[2], s1[1], s1[3]
    data = ct_of(truncated).read_bytes()
    ct_of(truncated).write_bytes(data[: len(data) // 3])
    lung = masks_of(bad_mask) / "left lung upper lobe.nii.gz"
    assert lung.is_file()
    image = sitk.ReadImage(str(lung))
    arr = sitk.GetArrayFromImage(image)
    arr[arr.shape[0] // 2, 0, 0] = 2
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(lung), useCompression=True)
    image = sitk.ReadImage(str(ct_of(nan_ct)))
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    arr[5, 50, 50] = np.nan
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(image)
    sitk.WriteImage(out, str(ct_of(nan_ct)), useCompression=True)
    shutil.rmtree(masks_of(no_masks))
    broken = {truncated: "truncated", bad_mask: "values other than 0 and 1", nan_ct: "NaN or inf voxels",
              no_masks: "mask folder not found"}

    targets = [f"results/{d}/shard-{k}.parquet" for k in (0, 1) for d in ("attributes", "qc/attributes")]
    targets += [f"results/features/demo-dinov2-r2/shard-{k}.zarr" for k in (0, 1)]
    proc = _snakemake(workdir, *targets)
    assert proc.returncode == 0, f"the run did not finish under on_error: skip:\n{proc.stderr[-6000:]}"
    print(f"workflow with 4 broken volumes: {time.perf_counter() - t0:.0f} s")

    seg = pd.concat(pd.read_parquet(res / "qc" / "segment" / f"shard-{k}.parquet") for k in (0, 1)).set_index("volume_id")
    reg = pd.concat(pd.read_parquet(res / "qc" / "regions" / f"shard-{k}.parquet") for k in (0, 1)).set_index("volume_id")
    for vid, reason in broken.items():
        where = seg if seg.loc[vid, "status"] == "error" else reg
        row = where.loc[vid]
        assert row["status"] == "error" and reason in row["error"] and vid in row["error"], (vid, row.to_dict())
        assert reg.loc[vid, "status"] in ("error", "skipped")
    assert seg.loc[truncated, "status"] == seg.loc[nan_ct, "status"] == seg.loc[no_masks, "status"] == "error"
    assert reg.loc[bad_mask, "status"] == "error" and lung.name in reg.loc[bad_mask, "error"]
    assert reg.loc[truncated, "error"].startswith("segment: ")  # skipped downstream, with the first reason

    good = [v for v in ids if v not in broken]
    assert (reg.loc[good, "status"] == "ok").all()
    masks = {v for k in (0, 1) for v in zarr.open_group(str(res / "masks" / f"shard-{k}.zarr"), mode="r").attrs["volume_ids"]}
    assert masks == set(good)
    attrs = pd.concat(pd.read_parquet(res / "attributes" / f"shard-{k}.parquet") for k in (0, 1))
    assert sorted(attrs["volume_id"]) == sorted(good)
    store = FeatureStore(sorted((res / "features" / "demo-dinov2-r2").glob("shard-*.zarr")))
    assert sorted(store.volume_ids) == sorted(good)
    log = (res / "logs" / "features" / "r2-shard-0.log").read_text(encoding="utf-8", errors="replace")
    assert f"volume {truncated} has no masks" in log
    assert not [p for p in res.rglob("*") if ".tmp" in p.name], "temporary files left behind"
