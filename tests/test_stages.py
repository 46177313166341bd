"""Unit tests of the data stages: cohort, regions, attributes, features pooling, reports."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO, write_image

from pipeline import attributes, cohort, features, regions, reports
from pipeline.constants import CHANNELS, REGIONS, TOKEN_MASKS
from pipeline.io import InputError

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")


# --- label table -----------------------------------------------------------------------------------


def test_label_table_covers_every_radgenome_name(shared_data: Path) -> None:
    lines = (shared_data / "label-maps" / "radgenome_anatomy_names.txt").read_text().splitlines()
    names = [line.split("\t")[1] for line in lines if line and not line.startswith("#")]
    missing = [n for n in names if TABLE.classify(n) == "unknown"]
    assert not missing, f"names missing from config/regions.yaml: {missing}"


def test_label_table_routes_fine_structures_to_region_and_attribute_channel() -> None:
    word = TABLE.bits["right lung middle lobe"]
    assert word == (1 << CHANNELS.index("lung")) | (1 << CHANNELS.index("right_middle_lobe"))
    assert TABLE.bits["lung nodule"] == 1 << CHANNELS.index("nodule")
    assert TABLE.classify("skin") == "unused"
    assert TABLE.classify("made-up organ") == "unknown"


def test_report_regions_map_every_observed_top_level_path(shared_data: Path) -> None:
    mapping = reports.load_report_regions(REPO / "config" / "regions.yaml")
    lines = (shared_data / "label-maps" / "radgenome_anatomy_paths_observed.txt").read_text().splitlines()
    tops = {line.split("/")[0] for line in lines if line and not line.startswith("#")}
    assert tops <= set(mapping), f"unmapped RadGenome regions: {tops - set(mapping)}"


# --- regions -----------------------------------------------------------------------------------------


def _case(tmp_path: Path, shape=(6, 10, 12)) -> tuple[Path, Path]:
    ct = write_image(tmp_path / "ct.nii.gz", np.full(shape, -800, np.int16))
    mask_dir = tmp_path / "seg_v1"
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
    assert vm.n_files == 5


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


def test_truncated_mask_names_volume_and_file(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    path = mask_dir / "lung nodule.nii.gz"
    path.write_bytes(path.read_bytes()[:60])
    with pytest.raises(InputError, match=r"volume v1: .*lung nodule\.nii\.gz"):
        regions.merge_volume("v1", ct, mask_dir, TABLE)


def test_run_shard_skip_mode_keeps_good_volumes_and_fail_mode_leaves_nothing(tmp_path: Path) -> None:
    ct, mask_dir = _case(tmp_path)
    manifest = pd.DataFrame({"volume_id": ["v1", "v2"], "shard": [0, 0], "ct_path": [str(ct)] * 2,
                             "mask_dir": [str(mask_dir), str(tmp_path / "nope")]})
    out, qc = tmp_path / "m.zarr", tmp_path / "qc.parquet"
    with pytest.raises(InputError, match="volume v2: mask folder not found"):
        regions.run_shard(manifest, 0, TABLE, out, qc, on_error="fail")
    assert not out.exists() and not qc.exists()
    assert not list(tmp_path.glob(".m.zarr.tmp*"))
    table = regions.run_shard(manifest, 0, TABLE, out, qc, on_error="skip")
    assert table.set_index("volume_id")["status"].to_dict() == {"v1": "ok", "v2": "error"}
    import zarr

    group = zarr.open_group(str(out), mode="r")
    assert group.attrs["volume_ids"] == ["v1"] and group["v1"].dtype == np.uint32


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
    attrs = attributes.volume_attributes(labels, spacing_xyz=(1.0, 1.0, 3.0))
    assert attrs["nodule_count"] == 2
    assert sorted(attrs["nodule_diameters_mm"]) == [3.0, 6.0]
    assert sorted(attrs["nodule_locations"]) == ["left lower lobe", "right upper lobe"]
    assert attrs["liver_ml"] == pytest.approx(10 * 10 * 10 * 3 / 1000, abs=0.05)
    assert attrs["cyst_count"] == 0 and attrs["cyst_locations"] == []
    prompt = attributes.render_prompt(attrs)
    assert "- Right Upper Lobe: 12.0 ml" in prompt and "Nodule:\n- count: 2" in prompt
    assert "Cyst:\n- count: 0\n- diameter (mm): none" in prompt


# --- features ---------------------------------------------------------------------------------------


def test_r2_picks_largest_area_slice_and_lita_uniform() -> None:
    area = torch.zeros(6, 8)
    area[0, 5] = 10
    area[0, 2] = 3
    area[1, 1] = 1
    slices, present = features.select_slices(area, "r2", depth=8)
    assert slices[:2] == [5, 1] and slices[2:] == [4, 4, 4, 4]  # empty regions -> middle slice
    assert present == [True, True, False, False, False, False]
    lita, _ = features.select_slices(area, "lita", depth=8)
    assert lita == [0, 1, 3, 4, 6, 7]


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("enc") / "encoder"
    features.build_demo_encoder(path, hidden_size=16, layers=2, heads=2)
    return features.load_encoder(path)


def test_encode_volume_shapes_and_mask_pooling(tiny_encoder) -> None:
    encoder, mean, std = tiny_encoder
    assert mean.tolist() == pytest.approx(features.RAD_DINO_MEAN)  # read from the processor config
    ct = np.random.default_rng(0).normal(-500, 300, (12, 40, 40)).astype(np.float32)
    labels = np.zeros(ct.shape, np.uint32)
    labels[3:6] |= _bit("lung")
    labels[8:9, 10:20, 10:20] |= _bit("heart")
    cfg = features.FeatureConfig(input_size=(8, 256, 256), layers=(1, 2), batch_size=3)
    out = features.encode_volume(encoder, mean, std, ct, labels, cfg)
    c = encoder.config.hidden_size
    assert out["global"].shape == (8, c)
    assert out["global"].shape[0] + out["region"].shape[0] == 8 + 324  # D + T vision tokens
    assert out["mask_pooled"].shape == (len(TOKEN_MASKS), 2, c)
    assert out["mask_grid"].shape == (len(TOKEN_MASKS), 8, 16, 16)
    present = dict(zip(TOKEN_MASKS, out["mask_present"]))
    assert present["lung"] and present["heart"] and not present["nodule"]
    assert not out["mask_pooled"][TOKEN_MASKS.index("nodule")].any()
    lung_slice, heart_slice = out["region_slices"][0], out["region_slices"][REGIONS.index("heart")]
    assert 2 <= lung_slice <= 3 and heart_slice == 5  # z 3:6 of 12 -> 2..3 of 8; z 8 -> 5 of 8


# --- cohort and reports ---------------------------------------------------------------------------


def test_radgenome_paths_and_unsafe_ids() -> None:
    path = cohort.radgenome_ct_path(Path("vols"), "train_12_a_1")
    assert path == Path("vols/train_12/train_12a/train_12_a_1.nii.gz")
    assert cohort.patient_of("valid_7_b_2") == "valid_7"
    for bad in ("../etc", "a/b", "x..y", ""):
        with pytest.raises(InputError, match="unsafe volume id"):
            cohort.validate_volume_id(bad, "test.csv")


def test_keyword_region_fallback() -> None:
    texts = reports.region_texts_from_keywords(
        "Trachea and both main bronchi are open. A 5 mm nodule is seen in the right lung. "
        "Heart size is normal. No lytic lesion in the bones."
    )
    assert texts["airways"].startswith("Trachea") and "nodule" in texts["lung"]
    assert texts["heart"] == "Heart size is normal." and "lytic" in texts["osseous"]


def test_truncated_ct_names_volume_and_file(tmp_path: Path) -> None:
    from pipeline.io import image_array, read_image

    path = write_image(tmp_path / "train_1_a_1.nii.gz", np.zeros((20, 30, 30), np.int16))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(InputError, match=r"volume train_1_a_1: .*train_1_a_1\.nii\.gz"):
        image_array(read_image(path, "train_1_a_1"), path, "train_1_a_1")


def test_truncated_gzip_is_caught_although_itk_would_zero_fill(tmp_path: Path) -> None:
    """ITK reads a truncated .nii.gz without error (zero-filled voxels); our reader must refuse it."""
    import SimpleITK as sitk

    from pipeline.io import read_image

    ct = np.random.default_rng(0).integers(-1000, 1000, (16, 32, 32)).astype(np.int16)
    path = write_image(tmp_path / "v.nii.gz", ct)
    data = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == ct.shape  # ITK: silently
    with pytest.raises(InputError, match=r"volume v: .*cut\.nii\.gz is truncated or corrupt"):
        read_image(cut, "v")
    # a multi-member gzip stream (trailer = last member only) is complete and must still read
    raw = gzip.decompress(data)
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert (sitk.GetArrayFromImage(read_image(multi, "v")) == ct).all()


def test_real_nifti_files_pass_the_gzip_check(shared_data: Path) -> None:
    from pipeline.io import read_image

    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        image = read_image(shared_data / "totalsegmentator" / name, name)
        assert image.GetDimension() == 3
