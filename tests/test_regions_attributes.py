"""The label table, the regions stage (masks -> packed channels) and the attributes stage."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import SimpleITK as sitk
import zarr
from helpers import REPO, huge_header_copy, write_box_masks, write_image

from pipeline import attributes, regions, reports
from pipeline.constants import ATTRIBUTE_STRUCTURES, CHANNELS, LESIONS, LOBES, REGIONS
from pipeline.io import InputError

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")


def _names(path: Path) -> list[str]:
    return [line.split("\t")[1] for line in path.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]


# --- label table -----------------------------------------------------------------------------------


def test_label_table_covers_every_radgenome_name(shared_data: Path) -> None:
    names = _names(shared_data / "label-maps" / "radgenome_anatomy_names.txt")
    missing = [n for n in names if TABLE.classify(n) == "unknown"]
    assert not missing, f"RadGenome names missing from config/regions.yaml: {missing}"
    extra = sorted(set(TABLE.vocabulary("radgenome").names) - set(names))
    assert not extra, f"config/regions.yaml lists names RadGenome does not have: {extra}"


def test_label_table_covers_every_totalsegmentator_name(shared_data: Path) -> None:
    names = _names(shared_data / "label-maps" / "totalsegmentator_v2_total.tsv")
    assert len(names) == 117
    missing = [n for n in names if TABLE.classify(n, "totalsegmentator") == "unknown"]
    assert not missing, f"TotalSegmentator names missing from config/regions.yaml: {missing}"
    # beside the `total` task, only names seen in TotalSegmentator's own outputs of other models
    other = {regions.structure_name(p) for p in (shared_data / "totalsegmentator" / "aorta_report" / "masks").iterdir()}
    extra = set(TABLE.vocabulary("totalsegmentator").names) - set(names)
    assert extra and extra <= other, sorted(extra - other)


def test_label_table_routes_fine_structures_to_region_and_attribute_channel() -> None:
    word = TABLE.bits["right lung middle lobe"]
    assert word == (1 << CHANNELS.index("lung")) | (1 << CHANNELS.index("right_middle_lobe"))
    assert TABLE.bits["lung nodule"] == 1 << CHANNELS.index("nodule")
    assert TABLE.classify("skin") == "unused" and TABLE.unused["skin"]
    assert TABLE.classify("made-up organ") == "unknown"
    ts = TABLE.vocabulary("totalsegmentator")
    assert ts.bits["lung_middle_lobe_right"] == word
    assert ts.bits["kidney_left"] == TABLE.bits["left kidney"]
    assert ts.classify("brain") == "unused"
    # every attribute structure and lesion channel is reachable from the RadGenome names
    reachable = 0
    for w in TABLE.bits.values():
        reachable |= w
    assert regions.channel_names(reachable) == list(CHANNELS)


def test_report_regions_map_every_observed_top_level_path(shared_data: Path) -> None:
    mapping = reports.load_report_regions(REPO / "config" / "regions.yaml")
    lines = (shared_data / "label-maps" / "radgenome_anatomy_paths_observed.txt").read_text(encoding="utf-8").splitlines()
    tops = {line.split("/")[0] for line in lines if line and not line.startswith("#")}
    assert tops <= set(mapping), f"unmapped RadGenome regions: {tops - set(mapping)}"


# --- regions -----------------------------------------------------------------------------------------


def _case(tmp_path: Path, shape=(6, 10, 12), vid: str = "v1") -> tuple[Path, Path]:
    ct = write_image(tmp_path / f"{vid}.nii.gz", np.full(shape, -800, np.int16))
    mask_dir = tmp_path / f"seg_{vid}"
    lobe = np.zeros(shape, np.uint8)
    lobe[:, :5] = 1
    nodule = np.zeros(shape, np.uint8)
    nodule[2:4, 1:3, 1:3] = 1
    write_image(mask_dir / "right lung upper lobe.nii.gz", lobe)
    write_image(mask_dir / "lung nodule.nii.gz", nodule)
    write_image(mask_dir / "kidney cyst.nii.gz", np.zeros(shape, np.uint8))
    write_image(mask_dir / "skin.nii.gz", np.ones(shape, np.uint8))
    write_image(mask_dir / "mystery structure.nii.gz", np.ones(shape, np.uint8))
    return ct, mask_dir


def _manifest(rows: list[tuple[str, Path, Path]]) -> pd.DataFrame:
    return pd.DataFrame({"volume_id": [r[0] for r in rows], "shard": [0] * len(rows),
                         "ct_path": [str(r[1]) for r in rows], "mask_dir": [str(r[2]) for r in rows]})


def _nothing_written(tmp_path: Path, *outputs: Path) -> None:
    for out in outputs:
        assert not out.exists(), out
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name], "temporary output left behind"


def test_merge_volume_packs_channels_and_reports_unknown_names(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    vm = regions.merge_volume("v1", ct, mask_dir, TABLE)
    lung = regions.unpack_channel(vm.labels, "lung")
    rul = regions.unpack_channel(vm.labels, "right_upper_lobe")
    nod = regions.unpack_channel(vm.labels, "nodule")
    assert lung.sum() == 6 * 5 * 12 and (lung == rul).all()
    assert nod.sum() == 2 * 2 * 2 and not regions.unpack_channel(vm.labels, "cyst").any()
    assert not regions.unpack_channel(vm.labels, "osseous").any()  # skin is 'unused'
    assert vm.unknown == ["mystery structure"]
    assert vm.n_files == 5 and vm.n_used == 3
    assert vm.boxes == {"lung": [0, 6, 0, 5, 0, 12], "nodule": [2, 4, 1, 3, 1, 3],
                        "right_upper_lobe": [0, 6, 0, 5, 0, 12]}
    assert regions.channel_names(vm.available) == ["lung", "nodule", "cyst", "right_upper_lobe"]


def test_fast_path_equals_simpleitk_path_with_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (9, 14, 16)
    names = ["right lung upper lobe", "left lung lower lobe", "left heart ventricle", "liver", "lung effusion",
             "right kidney cyst", "rib 3", "trachea", "thoracic vertebrae 5 (t5)", "left kidney"]
    ct = write_box_masks(tmp_path, shape, names, seed=1, start_max=6, length_max=(4, 9, 11))
    fast = regions.merge_volume("v", ct, tmp_path / "seg", TABLE, threads=2)
    again = regions.merge_volume("v", ct, tmp_path / "seg", TABLE, threads=1)  # pooled buffers were cleared
    grid = regions.read_ct_grid(ct, "v")
    grid.nifti_key = None  # forces every file through SimpleITK
    monkeypatch.setattr(regions.merge, "read_ct_grid", lambda *a, **k: grid)
    slow = regions.merge_volume("v", ct, tmp_path / "seg", TABLE)
    assert (fast.labels == slow.labels).all() and (again.labels == slow.labels).all()
    assert fast.boxes == slow.boxes
    expected = np.zeros(shape, np.uint32)
    for name in names:
        m = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg" / f"{name}.nii.gz"))) > 0
        expected[m] |= np.uint32(TABLE.bits[name])
    assert (fast.labels == expected).all()


def test_mask_on_other_grid_is_resampled_and_disjoint_mask_fails(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    # Same physical space at half the in-plane resolution: resampled by nearest neighbour, noted.
    coarse = np.zeros((6, 5, 6), np.uint8)
    coarse[:, :2] = 1
    write_image(mask_dir / "liver.nii.gz", coarse, spacing=(2.0, 2.0, 3.0), origin=(0.5, 0.5, 0.0))
    vm = regions.merge_volume("v1", ct, mask_dir, TABLE)
    assert vm.resampled == ["liver.nii.gz"]
    assert regions.unpack_channel(vm.labels, "liver").sum() > 0
    write_image(mask_dir / "spleen.nii.gz", coarse, origin=(500.0, 500.0, 500.0))
    with pytest.raises(InputError, match=r"volume v1: mask .*spleen.nii.gz does not overlap"):
        regions.merge_volume("v1", ct, mask_dir, TABLE)


# --- bad input: a clear error naming volume and file, nothing half-written ---------------------------


def _fail_shard(tmp_path: Path, manifest: pd.DataFrame, match: str, **kw) -> None:
    out, qc = tmp_path / "m.zarr", tmp_path / "qc.parquet"
    with pytest.raises(InputError, match=match):
        regions.run_shard(manifest, 0, TABLE, out, qc, on_error="fail", pictures=tmp_path / "pics", **kw)
    _nothing_written(tmp_path, out, qc, tmp_path / "pics")


def test_truncated_mask(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    path = mask_dir / "lung nodule.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 12])
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), r"volume v1: .*lung nodule\.nii\.gz is truncated")
    path.write_bytes(data[:60])
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), r"volume v1: .*lung nodule\.nii\.gz")


def test_mask_folder_missing(tmp_path: Path) -> None:
    ct, _ = _case(tmp_path)
    _fail_shard(tmp_path, _manifest([("v1", ct, tmp_path / "nope")]), r"volume v1: mask folder not found: .*nope")


@pytest.mark.parametrize("bad", ["two", "half", "nan"])
def test_mask_with_values_other_than_0_1(tmp_path: Path, bad: str) -> None:
    ct, mask_dir = _case(tmp_path)
    shape = (6, 10, 12)
    if bad == "two":
        m = np.zeros(shape, np.uint8)
        m[1, 2, 3] = 2
        match = r"volume v1: .*values other than 0 and 1"
    else:
        m = np.zeros(shape, np.float32)
        m[1, 2, 3] = 0.5 if bad == "half" else np.nan
        match = r"volume v1: mask .*liver\.nii\.gz (has values other than 0 and 1|contains NaN)"
    write_image(mask_dir / "liver.nii.gz", m)
    if bad == "two":
        match = r"volume v1: .*(liver\.nii\.gz|a mask) has values other than 0 and 1"
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), match)


def test_float_binary_masks_are_accepted(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    m = np.zeros((6, 10, 12), np.float32)
    m[1:3, 2:4, 3:5] = 1.0
    write_image(mask_dir / "liver.nii.gz", m)  # SAT writes float32 0/1 masks
    vm = regions.merge_volume("v1", ct, mask_dir, TABLE)
    assert regions.unpack_channel(vm.labels, "liver").sum() == 8


def test_non_overlapping_grids(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    write_image(mask_dir / "liver.nii.gz", np.ones((6, 10, 12), np.uint8), origin=(0.0, 0.0, 900.0))
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), r"volume v1: mask .*liver\.nii\.gz does not overlap")


def test_4d_ct_and_4d_mask(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    four = sitk.GetImageFromArray(np.zeros((2, 6, 10, 12), np.uint8), isVector=False)
    sitk.WriteImage(four, str(mask_dir / "liver.nii.gz"), useCompression=True)
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), r"volume v1: mask .*liver\.nii\.gz is 4D")
    (mask_dir / "liver.nii.gz").unlink()
    ct4 = tmp_path / "ct4.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 6, 10, 12), np.int16), isVector=False), str(ct4),
                    useCompression=True)
    _fail_shard(tmp_path, _manifest([("v1", ct4, mask_dir)]), r"volume v1: .*ct4\.nii\.gz is 4D")


def test_header_beyond_memory_cap_is_refused_before_reading(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    big = huge_header_copy(ct, tmp_path / "big.nii.gz", (30000, 30000, 2000))
    _fail_shard(tmp_path, _manifest([("v1", big, mask_dir)]),
                r"volume v1: .*big\.nii\.gz has 30000x30000x2000 voxels.*over the memory cap", memory_cap_gb=4)
    huge_header_copy(mask_dir / "lung nodule.nii.gz", mask_dir / "liver.nii.gz", (30000, 30000, 2000))
    _fail_shard(tmp_path, _manifest([("v1", ct, mask_dir)]), r"volume v1: .*liver\.nii\.gz .*over the memory cap",
                memory_cap_gb=4)


@pytest.mark.parametrize("vid", ["../evil", "a/b", "x..y"])
def test_unsafe_volume_id(tmp_path: Path, vid: str) -> None:
    ct, mask_dir = _case(tmp_path)
    _fail_shard(tmp_path, _manifest([(vid, ct, mask_dir)]), "unsafe volume id")
    out, qc = tmp_path / "m.zarr", tmp_path / "qc.parquet"
    table = regions.run_shard(_manifest([(vid, ct, mask_dir)]), 0, TABLE, out, qc, on_error="skip")
    assert table["status"].tolist() == ["error"] and "unsafe volume id" in table["error"][0]
    assert zarr.open_group(str(out), mode="r").attrs["volume_ids"] == []


def test_run_shard_skip_mode_keeps_good_volumes_and_fail_mode_leaves_nothing(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    manifest = _manifest([("v1", ct, mask_dir), ("v2", ct, tmp_path / "nope")])
    out, qc, pics = tmp_path / "m.zarr", tmp_path / "qc.parquet", tmp_path / "pics"
    with pytest.raises(InputError, match="volume v2: mask folder not found"):
        regions.run_shard(manifest, 0, TABLE, out, qc, on_error="fail", pictures=pics)
    _nothing_written(tmp_path, out, qc, pics)
    table = regions.run_shard(manifest, 0, TABLE, out, qc, on_error="skip", pictures=pics, n_pictures=2)
    assert list(table.columns[:4]) == ["volume_id", "stage", "status", "error"]
    assert table.set_index("volume_id")["status"].to_dict() == {"v1": "ok", "v2": "error"}
    assert (table["stage"] == "regions").all() and "v2" in table["error"][1] and "nope" in table["error"][1]
    assert list(table["unknown"][0]) == ["mystery structure"]
    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["volume_ids"] == ["v1"] and group["v1"].dtype == np.uint32
    assert group["v1"].attrs["channel_boxes"]["nodule"] == [2, 4, 1, 3, 1, 3]
    assert [p.name for p in pics.iterdir()] == ["v1.png"] and (pics / "v1.png").stat().st_size > 5000


def test_segment_errors_are_skipped_downstream(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    manifest = _manifest([("v1", ct, mask_dir), ("v2", ct, mask_dir)])
    segment = pd.DataFrame({"volume_id": ["v1", "v2"], "status": ["ok", "error"],
                            "error": ["", "volume v2: CT file not found: x.nii.gz"],
                            "mask_path": [str(mask_dir), ""], "mask_format": ["folder", "folder"],
                            "vocabulary": ["radgenome", "radgenome"], "label_names": ["", ""]})
    table = regions.run_shard(manifest, 0, TABLE, tmp_path / "m.zarr", tmp_path / "qc.parquet", on_error="fail",
                              segment=segment)
    assert table.set_index("volume_id")["status"].to_dict() == {"v1": "ok", "v2": "skipped"}
    assert "segment: volume v2: CT file not found" in table["error"][1]


def test_label_map_through_the_table(tmp_path: Path) -> None:
    shape = (5, 8, 9)
    ct = write_image(tmp_path / "ct.nii.gz", np.zeros(shape, np.int16))
    lab = np.zeros(shape, np.uint8)
    lab[0:2] = 10  # lung_upper_lobe_left
    lab[3, 0:4] = 5  # liver
    lab[4, 0, 0] = 99  # not a known class
    write_image(tmp_path / "seg.nii.gz", lab)
    names = {0: "background", 10: "lung_upper_lobe_left", 5: "liver", 90: "brain"}
    vm = regions.merge_labelmap("v", ct, tmp_path / "seg.nii.gz", names, TABLE)
    assert regions.unpack_channel(vm.labels, "left_upper_lobe").sum() == 2 * 8 * 9
    assert (regions.unpack_channel(vm.labels, "lung") == regions.unpack_channel(vm.labels, "left_upper_lobe")).all()
    assert regions.unpack_channel(vm.labels, "liver").sum() == 4 * 9
    assert vm.unknown == ["label 99"]
    assert "left_atrium" not in regions.channel_names(vm.available)


def test_totalsegmentator_example_through_the_table(shared_data: Path) -> None:
    """Real CT + real TotalSegmentator v2 label map: volumes = voxel count x voxel volume; regions present."""
    ts = shared_data / "totalsegmentator"
    names = regions.read_label_names(shared_data / "label-maps" / "totalsegmentator_v2_total.tsv")
    vm = regions.merge_labelmap("example_ct_sm", ts / "example_ct_sm.nii.gz", ts / "example_seg.nii.gz", names, TABLE)
    assert vm.unknown == [] and vm.n_used == sum(TABLE.classify(n, "totalsegmentator") == "used" for n in names.values())
    seg = sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    lab = sitk.GetArrayFromImage(seg)
    voxel_mm3 = float(np.prod(seg.GetSpacing()))
    attrs = attributes.volume_attributes(vm.labels, seg.GetSpacing(), available=regions.channel_names(vm.available))
    by_name = {v: k for k, v in names.items()}
    expect = {"right_upper_lobe": "lung_upper_lobe_right", "right_middle_lobe": "lung_middle_lobe_right",
              "right_lower_lobe": "lung_lower_lobe_right", "left_upper_lobe": "lung_upper_lobe_left",
              "left_lower_lobe": "lung_lower_lobe_left", "liver": "liver", "left_kidney": "kidney_left",
              "right_kidney": "kidney_right"}
    for channel, ts_name in expect.items():
        count = int((lab == by_name[ts_name]).sum())
        if count:
            assert attrs[f"{channel}_ml"] == pytest.approx(round(count * voxel_mm3 / 1000, 1)), channel
        else:  # the right upper lobe is above this abdominal scan: not seen, never 0.0 ml
            assert math.isnan(attrs[f"{channel}_ml"]) and attrs[f"{channel}_assessed"], channel
    assert attrs["liver_ml"] > 100 and attrs["right_kidney_ml"] > 10
    assert math.isnan(attrs["left_atrium_ml"])  # v2 `total` has no heart chambers
    prompt = attributes.render_prompt(attrs)
    assert "- Left Atrium: not assessed" in prompt and "- Right Upper Lobe: not seen in the scan" in prompt
    for region in ("lung", "heart", "osseous", "abdomen"):
        assert regions.unpack_channel(vm.labels, region).any(), region


# --- attributes ------------------------------------------------------------------------------------


def _bit(name: str) -> np.uint32:
    return np.uint32(1 << CHANNELS.index(name))


def test_attributes_count_diameter_location_and_volume() -> None:
    labels = np.zeros((10, 40, 40), np.uint32)
    labels[:, :20, :20] |= _bit("right_upper_lobe") | _bit("lung")
    labels[:, 20:, :20] |= _bit("left_lower_lobe") | _bit("lung")
    labels[2:4, 5:10, 5:8] |= _bit("nodule")  # extents: z 2 x 3 mm, y 5 x 1, x 3 x 1 -> 6 mm
    labels[5:6, 25:28, 10:12] |= _bit("nodule")  # 3, 3, 2 -> 3 mm
    labels[:, 30:, 30:] |= _bit("liver")
    attrs = attributes.volume_attributes(labels, spacing_xyz=(1.0, 1.0, 3.0), min_lesion_mm3=0)
    assert attrs["nodule_count"] == 2
    assert attrs["nodule_diameters_mm"] == [6.0, 3.0]  # largest first
    assert attrs["nodule_locations"] == ["right upper lobe", "left lower lobe"]
    assert attrs["liver_ml"] == pytest.approx(10 * 10 * 10 * 3 / 1000, abs=0.05)
    assert attrs["cyst_count"] == 0 and attrs["cyst_locations"] == []
    prompt = attributes.render_prompt(attrs)
    assert "- Right Upper Lobe: 12.0 ml" in prompt and "Nodule:\n- count: 2" in prompt
    assert "- diameter (mm): 6.0, 3.0" in prompt and "Liver: 3.0 ml" in prompt
    assert "Cyst:\n- count: 0\n- diameter (mm): none\n- location: none" in prompt
    boxes = {"right_upper_lobe": [0, 10, 0, 20, 0, 20], "left_lower_lobe": [0, 10, 20, 40, 0, 20],
             "nodule": [2, 6, 5, 28, 5, 12], "liver": [0, 10, 30, 40, 30, 40], "lung": [0, 10, 0, 40, 0, 20]}
    assert attributes.volume_attributes(labels, (1.0, 1.0, 3.0), 0, boxes=boxes) == attrs


def test_diagonal_touching_blobs_are_one_lesion_and_small_ones_are_dropped() -> None:
    labels = np.zeros((12, 20, 20), np.uint32)
    labels[2:4, 2:4, 2:4] |= _bit("nodule")
    labels[4:6, 4:6, 4:6] |= _bit("nodule")  # touches the first only at a corner (26-connectivity)
    labels[9, 15, 15] |= _bit("nodule")  # one voxel: 1 mm^3
    attrs = attributes.volume_attributes(labels, (1.0, 1.0, 1.0), min_lesion_mm3=5.0)
    assert attrs["nodule_count"] == 1 and attrs["nodule_diameters_mm"] == [4.0]
    assert attributes.volume_attributes(labels, (1.0, 1.0, 1.0), min_lesion_mm3=0)["nodule_count"] == 2


@pytest.mark.parametrize("offset", [(0.0, 0.0, 0.0), (0.3, 0.45, 0.2), (0.5, 0.1, 0.7)])
@pytest.mark.parametrize("diameter", [6.0, 11.0, 23.0])
def test_sphere_diameter_within_one_voxel_spacing_anisotropic(diameter: float, offset: tuple) -> None:
    spacing = (0.7, 0.7, 1.5)  # x, y, z mm
    shape = (40, 60, 60)
    z, y, x = np.indices(shape).astype(float)
    centre = np.array([20 + offset[2], 30 + offset[1], 30 + offset[0]])
    r2 = ((x - centre[2]) * spacing[0]) ** 2 + ((y - centre[1]) * spacing[1]) ** 2 + ((z - centre[0]) * spacing[2]) ** 2
    labels = np.where(r2 <= (diameter / 2) ** 2, _bit("nodule"), np.uint32(0)).astype(np.uint32)
    attrs = attributes.volume_attributes(labels, spacing, min_lesion_mm3=0)
    assert attrs["nodule_count"] == 1
    assert abs(attrs["nodule_diameters_mm"][0] - diameter) <= max(spacing), attrs["nodule_diameters_mm"]


def test_unavailable_channels_render_as_not_available() -> None:
    labels = np.zeros((4, 6, 6), np.uint32)
    available = [c for c in CHANNELS if c not in ("left_atrium", "effusion")]
    attrs = attributes.volume_attributes(labels, (1, 1, 1), available=available)
    assert math.isnan(attrs["left_atrium_ml"]) and math.isnan(attrs["right_atrium_ml"])  # neither is 0.0 ml
    assert attrs["left_atrium_assessed"] is False and attrs["right_atrium_assessed"] is True
    assert attrs["effusion_assessed"] is False and attrs["nodule_assessed"] is True
    prompt = attributes.render_prompt(attrs)
    assert "- Left Atrium: not assessed" in prompt and "- Right Atrium: not seen in the scan" in prompt
    assert "0.0 ml" not in prompt
    assert "Effusion:\n- not assessed" in prompt and "Nodule:\n- count: 0" in prompt


def test_attributes_parquet_schema_and_qc(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    out = tmp_path / "m.zarr"
    regions.run_shard(_manifest([("v1", ct, mask_dir)]), 0, TABLE, out, tmp_path / "qc.parquet")
    df = attributes.run_shard(out, tmp_path / "a.parquet", min_lesion_mm3=10.0, qc_out=tmp_path / "aqc.parquet")
    schema = pq.read_schema(tmp_path / "a.parquet")
    assert schema.names == attributes.SCHEMA.names
    assert schema.field("nodule_diameters_mm").type == attributes.SCHEMA.field("nodule_diameters_mm").type
    assert schema.metadata[b"min_lesion_mm3"] == b"10.0"
    assert {"volume_id", "prompt", *(f"{s}_ml" for s in ATTRIBUTE_STRUCTURES), *(f"{x}_count" for x in LESIONS)} \
        <= set(df.columns)
    assert df["nodule_count"].tolist() == [1] and df["nodule_diameters_mm"][0].tolist() == [6.0]
    assert df["right_upper_lobe_ml"][0] == pytest.approx(6 * 5 * 12 * 3 / 1000, abs=0.05)
    assert math.isnan(df["liver_ml"][0])  # no liver file in this case: not available, not 0 ml
    assert pd.read_parquet(tmp_path / "aqc.parquet")[["volume_id", "stage", "status"]].values.tolist() == \
        [["v1", "attributes", "ok"]]
    # an empty shard keeps the schema
    empty = tmp_path / "e.zarr"
    regions.run_shard(_manifest([("v9", ct, tmp_path / "nope")]), 0, TABLE, empty, tmp_path / "eqc.parquet",
                      on_error="skip")
    attributes.run_shard(empty, tmp_path / "e.parquet")
    assert pq.read_schema(tmp_path / "e.parquet").names == attributes.SCHEMA.names


def test_prompt_lists_lobes_in_fixed_order() -> None:
    attrs = attributes.volume_attributes(np.zeros((2, 2, 2), np.uint32), (1, 1, 1))
    prompt = attributes.render_prompt(attrs)
    positions = [prompt.index(attributes.PROMPT_NAMES[n]) for n in LOBES]
    assert positions == sorted(positions) and prompt.startswith("Organ Volumes:\nLung:")
    assert all(f"{r}" for r in REGIONS)


# --- the RadGenome-scale demo case -----------------------------------------------------------------


def test_radgenome_scale_case_has_every_structure_file(tmp_path: Path) -> None:
    from pipeline.demo.radgenome_scale import VOLUME_ID, radgenome_names, write_radgenome_scale_case

    out = write_radgenome_scale_case(tmp_path / "case", shape_xyz=(96, 80, 24))
    files = regions.structure_files(out / "masks" / f"seg_{VOLUME_ID}", VOLUME_ID)
    names, _ = radgenome_names()
    assert sorted(regions.structure_name(p) for p in files) == names and len(names) == 210
    img = sitk.ReadImage(str(out / "volumes" / f"{VOLUME_ID}.nii.gz"))
    assert img.GetSize() == (96, 80, 24) and img.GetSpacing() == (1.0, 1.0, 3.0)
    vm = regions.merge_volume(VOLUME_ID, out / "volumes" / f"{VOLUME_ID}.nii.gz",
                              out / "masks" / f"seg_{VOLUME_ID}", TABLE, threads=2)
    assert vm.unknown == [] and all(regions.unpack_channel(vm.labels, r).any() for r in REGIONS)


def test_zlib_fallback_without_libdeflate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.deflate as io

    ct, mask_dir = _case(tmp_path)
    monkeypatch.setattr(io, "_SPARSE", None)  # the libdeflate path, not the sparse inflater
    monkeypatch.setattr(regions.workspace, "_POOL", {})
    with_libdeflate = regions.merge_volume("v1", ct, mask_dir, TABLE)
    monkeypatch.setattr(io, "_LIBDEFLATE", None)
    monkeypatch.setattr(regions.workspace, "_POOL", {})  # fresh workspaces: their inflaters use zlib
    without = regions.merge_volume("v1", ct, mask_dir, TABLE)
    assert (with_libdeflate.labels == without.labels).all()
    path = mask_dir / "lung nodule.nii.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(InputError, match=r"volume v1: .*lung nodule\.nii\.gz is truncated"):
        regions.merge_volume("v1", ct, mask_dir, TABLE)


def test_direct_chunk_writer_reads_back_like_zarr(tmp_path: Path) -> None:
    labels = np.zeros((35, 4, 5), np.uint32)  # 3 chunks of 16 slices: one empty, one partial edge chunk
    labels[3, 1, 2] = 7
    labels[33:, :, 1] = 1 << 20
    grid = regions.CtGrid((5, 4, 35), (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), None)
    vm = regions.VolumeMasks(labels, grid, boxes={})
    for name, root in (("direct", tmp_path / "d.zarr"), ("zarr", None)):
        path = tmp_path / f"{name}.zarr"
        group = zarr.open_group(str(path), mode="w", zarr_format=3)
        regions.write_volume(group, "v", vm, path if root is not None else None)
        back = zarr.open_group(str(path), mode="r")["v"]
        assert (back[...] == labels).all() and back.attrs["spacing"] == [1.0, 1.0, 3.0]
        for threads in (1, 2):  # the attributes stage's direct chunk reader, on one and two threads
            stale = np.full(labels.shape, 99, np.uint32)  # a reused buffer: absent chunks must be zeroed
            assert (regions.read_labels(back, path / "v", stale, threads) == labels).all()
    assert sorted(p.name for p in (tmp_path / "direct.zarr" / "v" / "c").iterdir()) == ["0", "2"]
