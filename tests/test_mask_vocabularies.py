"""Precomputed masks in either vocabulary (RadGenome / SAT names, TotalSegmentator v2 names), as a folder
of per-structure files or as one label map with its label names, read through the manifest's
`mask_dir` / `mask_label_names` columns by the segment stage and merged by the regions stage.

Real data from ../shared/data (skipped when absent): the TotalSegmentator example CT with its label map
(also split into per-structure files, as TotalSegmentator writes without --ml) and the chest crop with
its per-structure masks. About 6 s on a 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import zarr
from helpers import REPO, split_labelmap, write_image

from pipeline import attributes, regions, segment
from pipeline.io import InputError

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
TSV = "label-maps/totalsegmentator_v2_total.tsv"


def _manifest(rows: list[dict[str, str]]) -> pd.DataFrame:
    return pd.DataFrame([{"shard": 0, **r} for r in rows])


def _segment_and_merge(tmp: Path, manifest: pd.DataFrame, **kw) -> tuple[pd.DataFrame, pd.DataFrame, zarr.Group]:
    seg = segment.run_shard(manifest, 0, "precomputed", tmp / "seg.parquet", qc_out=tmp / "segqc.parquet", **kw)
    qc = regions.run_shard(manifest, 0, TABLE, tmp / "masks.zarr", tmp / "qc.parquet", segment=seg,
                           on_error=kw.get("on_error", "fail"))
    return seg, qc, zarr.open_group(str(tmp / "masks.zarr"), mode="r")


def _kidney_volumes(labelmap: Path, names: dict[int, str]) -> dict[str, float]:
    image = sitk.ReadImage(str(labelmap))
    lab = sitk.GetArrayFromImage(image)
    by_name = {v: k for k, v in names.items()}
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    return {"left_kidney_ml": round(int((lab == by_name["kidney_left"]).sum()) * voxel_ml, 1),
            "right_kidney_ml": round(int((lab == by_name["kidney_right"]).sum()) * voxel_ml, 1)}


@pytest.mark.parametrize("form", ["folder", "labelmap_tsv", "labelmap_json"])
def test_totalsegmentator_masks_folder_or_labelmap_are_detected_and_merged(shared_data: Path, tmp_path: Path,
                                                                           form: str) -> None:
    ts = shared_data / "totalsegmentator"
    names = regions.read_label_names(shared_data / TSV)
    ct, labelmap = ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz"
    row = {"volume_id": "case01", "ct_path": str(ct)}
    if form == "folder":
        split_labelmap(labelmap, names, tmp_path / "seg_case01")
        row["mask_dir"] = str(tmp_path / "seg_case01")  # no mask_label_names column at all
    elif form == "labelmap_tsv":
        row.update(mask_dir=str(labelmap), mask_label_names=str(shared_data / TSV))
    else:
        (tmp_path / "names.json").write_text(json.dumps({str(k): v for k, v in names.items()}), encoding="utf-8")
        row.update(mask_dir=str(labelmap), mask_label_names=str(tmp_path / "names.json"))
    seg, qc, group = _segment_and_merge(tmp_path, _manifest([row]))
    s = seg.iloc[0]
    assert (s["status"], s["vocabulary"]) == ("ok", "totalsegmentator")
    assert s["mask_format"] == ("folder" if form == "folder" else "labelmap")
    assert s["n_structures"] == 117
    assert qc["status"].tolist() == ["ok"] and list(qc["unknown"][0]) == []
    arr = group["case01"]
    attrs = attributes.volume_attributes(arr[...], arr.attrs["spacing"], available=arr.attrs["channels_available"])
    for key, ml in _kidney_volumes(labelmap, names).items():
        assert attrs[key] == pytest.approx(ml) and ml > 10, key
    for lobe in ("right_lower_lobe", "left_upper_lobe", "left_lower_lobe"):
        assert attrs[f"{lobe}_ml"] > 0, lobe
    assert attrs["liver_ml"] > 500


def test_chest_crop_masks_detected_as_totalsegmentator_with_the_unknown_names_noted(shared_data: Path,
                                                                                    tmp_path: Path) -> None:
    crop = shared_data / "totalsegmentator" / "aorta_report"
    seg, qc, group = _segment_and_merge(tmp_path, _manifest([
        {"volume_id": "crop", "ct_path": str(crop / "ct_cropped.nii.gz"), "mask_dir": str(crop / "masks"),
         "mask_label_names": ""}]))
    assert seg["vocabulary"].tolist() == ["totalsegmentator"] and seg["status"].tolist() == ["ok"]
    unknown = sorted(qc["unknown"][0])
    # TotalSegmentator's internal model outputs: noted, and a minority, so the volume goes on
    assert unknown == ["T710_renal", "T713_annulus_proper", "T716_aorta_true_false_lumen", "organ_aorta_T264"]
    assert all(n in seg["note"][0] for n in unknown)
    labels = group["crop"][...]
    aorta = sitk.GetArrayFromImage(sitk.ReadImage(str(crop / "masks" / "aorta.nii.gz"))) != 0
    assert (regions.unpack_channel(labels, "heart") >= aorta).all() and aorta.any()
    assert regions.unpack_channel(labels, "osseous").any()  # vertebrae_T12


def test_mostly_unknown_names_fail_the_volume_or_skip_it_with_the_names(tmp_path: Path) -> None:
    shape = (4, 6, 7)
    ct = write_image(tmp_path / "ct.nii.gz", np.zeros(shape, np.int16))
    folder = tmp_path / "seg_v1"
    for name in ("liver", "gizzard", "swim bladder", "left antenna"):
        write_image(folder / f"{name}.nii.gz", np.ones(shape, np.uint8))
    good = tmp_path / "seg_v2"
    write_image(good / "liver.nii.gz", np.ones(shape, np.uint8))
    manifest = _manifest([{"volume_id": "v1", "ct_path": str(ct), "mask_dir": str(folder)},
                          {"volume_id": "v2", "ct_path": str(ct), "mask_dir": str(good)}])
    message = r"volume v1: 3 of 4 structure names in .*seg_v1 are not in the label table's 'radgenome' " \
              r"vocabulary: \['gizzard', 'left antenna', 'swim bladder'\]"
    with pytest.raises(InputError, match=message):
        segment.run_shard(manifest, 0, "precomputed", tmp_path / "seg.parquet")
    assert not (tmp_path / "seg.parquet").exists()
    # the regions stage, given the manifest alone, refuses it too
    with pytest.raises(InputError, match=message):
        regions.merge_volume("v1", ct, folder, TABLE)
    seg, qc, group = _segment_and_merge(tmp_path / "skip", manifest, on_error="skip")
    assert seg.set_index("volume_id")["status"].to_dict() == {"v1": "error", "v2": "ok"}
    segqc = pd.read_parquet(tmp_path / "skip" / "segqc.parquet").set_index("volume_id")
    assert segqc.loc["v1", "status"] == "error" and "gizzard" in segqc.loc["v1", "error"]
    assert qc.set_index("volume_id")["status"].to_dict() == {"v1": "skipped", "v2": "ok"}
    assert group.attrs["volume_ids"] == ["v2"]


def test_a_forced_vocabulary_that_does_not_fit_fails(shared_data: Path, tmp_path: Path) -> None:
    ts = shared_data / "totalsegmentator"
    manifest = _manifest([{"volume_id": "v1", "ct_path": str(ts / "example_ct_sm.nii.gz"),
                           "mask_dir": str(ts / "example_seg.nii.gz"), "mask_label_names": str(shared_data / TSV)}])
    with pytest.raises(InputError, match=r"volume v1: \d+ of 117 label names in .*totalsegmentator_v2_total\.tsv "
                                         r"are not in the label table's 'radgenome' vocabulary"):
        segment.run_shard(manifest, 0, "precomputed", tmp_path / "s.parquet", vocabulary="radgenome")


def test_detect_vocabulary_by_names() -> None:
    assert regions.detect_vocabulary(["left lung upper lobe", "liver", "heart"], TABLE) == "radgenome"
    assert regions.detect_vocabulary(["lung_upper_lobe_left", "liver", "heart"], TABLE) == "totalsegmentator"
    assert regions.detect_vocabulary(["liver"], TABLE) == "radgenome"  # a tie: the default


@pytest.mark.parametrize("text, message", [
    ("1\tliver\nx\tspleen\n", r"names\.tsv, line 2: expected a class id >= 0 and a name"),
    ("1\tliver\n1\tspleen\n", r"names\.tsv, line 2: class id 1 is given twice"),
    ("# only a comment\n", r"names\.tsv: no class names"),
])
def test_label_names_file_errors_name_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "names.tsv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=r"volume v1: .*" + message):
        regions.read_label_names(tmp_path / "names.tsv", "v1")


def test_regions_stage_reads_a_label_map_from_the_manifest_alone(shared_data: Path, tmp_path: Path) -> None:
    """Without a segment table (`python -m pipeline.regions` without --segment) the manifest's label map
    and label names are read the same way."""
    ts = shared_data / "totalsegmentator"
    manifest = _manifest([{"volume_id": "v1", "ct_path": str(ts / "example_ct_sm.nii.gz"),
                           "mask_dir": str(ts / "example_seg.nii.gz"), "mask_label_names": str(shared_data / TSV)}])
    qc = regions.run_shard(manifest, 0, TABLE, tmp_path / "masks.zarr", tmp_path / "qc.parquet")
    assert qc["status"].tolist() == ["ok"] and qc["n_used"][0] > 30
    labels = zarr.open_group(str(tmp_path / "masks.zarr"), mode="r")["v1"][...]
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(ts / "example_seg.nii.gz")))
    assert regions.unpack_channel(labels, "liver").sum() == (seg == 5).sum() > 0  # 5: liver
