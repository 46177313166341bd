"""One orientation (LPS, ITK's identity direction) for every CT and its masks.

Unit tests of `pipeline.orientation` (the turned grid holds the same physical voxels), and the real
TotalSegmentator example CT with its label map written three ways, as stored (x and y reversed against
LPS), already in LPS, and with permuted axes: the same physical image, so the regions stage's mask
array, the attributes and the features must come out equal. Real data from ../shared/data (skipped when
absent). About 15 s on a 2-core machine.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import zarr
from helpers import REPO, SHARED_DATA, write_image

from pipeline import attributes, regions, segment
from pipeline.constants import TOKEN_MASKS
from pipeline.feature_store import FeatureStore
from pipeline.features.config import FeatureConfig
from pipeline.features.encoder import build_demo_encoder
from pipeline.features.stage import canonical_ct, run_shard
from pipeline.io import InputError
from pipeline.orientation import CANONICAL, reorientation

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")


def _physical(size, spacing, origin, direction, idx_xyz: np.ndarray) -> np.ndarray:
    d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    return np.asarray(origin, float) + idx_xyz @ d.T


def _rewritten(image: sitk.Image, axes: tuple[int, int, int], flip: tuple[bool, bool, bool]) -> sitk.Image:
    """The same physical image stored another way: new index axis j = old index axis axes[j], reversed
    where flip[j]; direction, spacing and origin follow, so every voxel keeps its physical place."""
    a = sitk.GetArrayFromImage(image)  # (z, y, x)
    d = np.asarray(image.GetDirection(), float).reshape(3, 3)
    sp, o, size = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin()), image.GetSize()
    b = np.transpose(a, [2 - axes[2 - k] for k in range(3)])
    new_d = np.zeros((3, 3))
    for j, (old, f) in enumerate(zip(axes, flip)):
        new_d[:, j] = -d[:, old] if f else d[:, old]
        if f:
            o = o + (size[old] - 1) * sp[old] * d[:, old]
            b = np.flip(b, axis=2 - j)
    out = sitk.GetImageFromArray(np.ascontiguousarray(b))
    out.SetSpacing(tuple(float(sp[x]) for x in axes))
    out.SetOrigin(tuple(float(v) for v in o))
    out.SetDirection(tuple(float(v) for v in new_d.reshape(-1)))
    return out


@pytest.mark.parametrize("axes", list(itertools.permutations(range(3))))
@pytest.mark.parametrize("flip", [(False, False, False), (True, False, True), (True, True, True)])
def test_canonical_grid_holds_the_same_physical_voxels(axes, flip) -> None:
    rng = np.random.default_rng(0)
    source = sitk.GetImageFromArray(rng.integers(0, 1000, (5, 6, 7)).astype(np.int16))
    source.SetSpacing((0.7, 0.8, 2.5))
    source.SetOrigin((10.0, -20.0, 30.0))
    image = _rewritten(source, axes, flip)  # stored another way
    turn = reorientation(image.GetDirection())
    assert turn.identity == (axes == (0, 1, 2) and not any(flip))
    arr = sitk.GetArrayFromImage(image)
    canon = turn.array(arr)
    size, spacing, origin, direction = turn.grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(),
                                                 image.GetDirection())
    assert np.allclose(np.asarray(direction).reshape(3, 3), np.eye(3))
    # the canonical array is the source's: same voxels, same geometry
    assert np.array_equal(canon, sitk.GetArrayFromImage(source)) and size == source.GetSize()
    assert np.allclose(spacing, source.GetSpacing()) and np.allclose(origin, source.GetOrigin())
    # a box follows the voxels
    box = [1, 4, 2, 5, 0, 3]
    sub = np.zeros(arr.shape, bool)
    sub[1:4, 2:5, 0:3] = True
    z0, z1, y0, y1, x0, x1 = turn.box(box, arr.shape)
    moved = np.zeros(canon.shape, bool)
    moved[z0:z1, y0:y1, x0:x1] = True
    assert np.array_equal(turn.array(sub), moved)


def test_physical_position_of_every_voxel_is_kept() -> None:
    source = sitk.GetImageFromArray(np.zeros((3, 4, 5), np.int16))
    source.SetSpacing((0.5, 1.0, 3.0))
    source.SetOrigin((1.0, 2.0, 3.0))
    image = _rewritten(source, (2, 0, 1), (True, False, True))
    turn = reorientation(image.GetDirection())
    # index of each stored voxel, carried through the turn as values
    z, y, x = np.indices(sitk.GetArrayFromImage(image).shape)
    stored = np.stack([x, y, z], -1)  # (z, y, x, 3): each voxel's own stored index
    canon = np.stack([turn.array(stored[..., k]) for k in range(3)], -1)
    grid = turn.grid(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    cz, cy, cx = np.indices(canon.shape[:3])
    here = _physical(*grid, np.stack([cx, cy, cz], -1).reshape(-1, 3))
    there = _physical(image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection(),
                      canon.reshape(-1, 3).astype(float))
    assert np.allclose(here, there)


def test_degenerate_direction_is_refused() -> None:
    c = math.sqrt(0.5)
    with pytest.raises(ValueError, match="three distinct patient axes"):
        reorientation((c, c, 0, c, c, 0, 0, 0, 1))
    ct = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(InputError, match="volume v: ct.nii.gz: direction matrix"):
        canonical_ct(ct, (c, c, 0, c, c, 0, 0, 0, 1), "ct.nii.gz", "v", CANONICAL)


def test_features_refuse_a_turned_ct_with_masks_from_before_reorientation() -> None:
    ct = np.zeros((2, 3, 4), np.float32)
    assert canonical_ct(ct, (1, 0, 0, 0, 1, 0, 0, 0, 1), "ct.nii.gz", "v", None) is ct  # LPS: as it is
    with pytest.raises(InputError, match="volume v: ct.nii.gz is not stored in LPS .* rerun the regions stage"):
        canonical_ct(ct, (-1, 0, 0, 0, -1, 0, 0, 0, 1), "ct.nii.gz", "v", None)


def test_an_lps_volume_is_stored_as_it_is(tmp_path: Path) -> None:
    """The fast path's chunks and boxes are kept for a CT already in LPS (the demo, RadGenome)."""
    shape = (20, 10, 12)
    ct = write_image(tmp_path / "ct.nii.gz", np.zeros(shape, np.int16))
    lobe = np.zeros(shape, np.uint8)
    lobe[3:18, 2:6, 1:7] = 1
    write_image(tmp_path / "seg" / "left lung upper lobe.nii.gz", lobe)
    item = {"volume_id": "v", "ct_path": str(ct), "mask_path": str(tmp_path / "seg"), "mask_format": "folder",
            "vocabulary": "radgenome", "label_names": ""}
    vm = regions.process_volume(item, TABLE, 1, None, encode=True)
    assert vm.encoded and vm.boxes["left_upper_lobe"] == [3, 18, 2, 6, 1, 7]


# ---- the real example, stored three ways ------------------------------------------------------------

VARIANTS = {
    "as_stored": ((0, 1, 2), (False, False, False)),  # TotalSegmentator's example: x and y against LPS
    "lps": ((0, 1, 2), (True, True, False)),  # rewritten in LPS (identity direction)
    "permuted": ((2, 0, 1), (False, True, True)),  # z stored first, and flipped
}


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    ts = SHARED_DATA / "totalsegmentator"
    tsv = SHARED_DATA / "label-maps" / "totalsegmentator_v2_total.tsv"
    tmp = tmp_path_factory.mktemp("orientation")
    ct, seg = sitk.ReadImage(str(ts / "example_ct_sm.nii.gz")), sitk.ReadImage(str(ts / "example_seg.nii.gz"))
    rows = []
    for name, (axes, flip) in VARIANTS.items():
        sitk.WriteImage(_rewritten(ct, axes, flip), str(tmp / f"{name}_ct.nii.gz"), useCompression=True)
        sitk.WriteImage(_rewritten(seg, axes, flip), str(tmp / f"{name}_seg.nii.gz"), useCompression=True)
        rows.append({"volume_id": name, "shard": 0, "ct_path": str(tmp / f"{name}_ct.nii.gz"),
                     "mask_dir": str(tmp / f"{name}_seg.nii.gz"), "mask_label_names": str(tsv)})
    manifest = pd.DataFrame(rows)
    seg_table = segment.run_shard(manifest, 0, "precomputed", tmp / "seg.parquet")
    regions.run_shard(manifest, 0, TABLE, tmp / "masks.zarr", tmp / "qc.parquet", segment=seg_table,
                      pictures=tmp / "pics", n_pictures=1)  # the first: stored against LPS
    attrs = attributes.run_shard(tmp / "masks.zarr", tmp / "attrs.parquet").set_index("volume_id")
    build_demo_encoder(tmp / "encoder", hidden_size=32, layers=2, heads=2)
    cfg = FeatureConfig(input_size=(8, 56, 56), layers=(1, 2), pooling="lita", slices=4, region_grid=(2, 2),
                        mask_grid=(2, 4, 4), workers=0, device="cpu")
    run_shard(manifest, 0, tmp / "masks.zarr", str(tmp / "encoder"), None, cfg, tmp / "features.zarr")
    return {"masks": zarr.open_group(str(tmp / "masks.zarr"), mode="r"), "attrs": attrs,
            "features": FeatureStore([tmp / "features.zarr"]), "tmp": tmp}


def test_the_same_volume_stored_three_ways_gives_one_mask_array(variants) -> None:
    masks = variants["masks"]
    assert masks.attrs["orientation"] == "LPS"
    first = masks["lps"]
    for name in VARIANTS:
        arr = masks[name]
        assert np.array_equal(arr[...], first[...]), name
        for key in ("spacing", "origin", "direction"):
            assert np.allclose(arr.attrs[key], first.attrs[key], atol=1e-4), (name, key)
        assert arr.attrs["channels_available"] == first.attrs["channels_available"]
    assert np.allclose(first.attrs["direction"], np.eye(3).reshape(-1))
    # the canonical grid: the liver (patient right) lies at low x, the spine (posterior) at high y
    labels = first[...]
    liver = np.argwhere(regions.unpack_channel(labels, "liver"))
    bone = np.argwhere(regions.unpack_channel(labels, "osseous"))
    assert liver[:, 2].mean() < labels.shape[2] / 2 and bone[:, 1].mean() > liver[:, 1].mean()
    assert (variants["tmp"] / "pics" / "as_stored.png").is_file()


def test_the_same_volume_stored_three_ways_gives_equal_attributes(variants) -> None:
    attrs = variants["attrs"]
    for name in VARIANTS:
        a, b = attrs.loc[name], attrs.loc["lps"]
        assert a["prompt"] == b["prompt"], name
        for col in attrs.columns:
            x, y = a[col], b[col]
            if isinstance(x, float) and math.isnan(x):
                assert math.isnan(y), (name, col)
            elif isinstance(x, np.ndarray):
                assert x.tolist() == y.tolist(), (name, col)
            else:
                assert x == y, (name, col)
    assert attrs.loc["lps", "liver_ml"] > 500 and attrs.loc["lps", "liver_partial"]


def test_the_same_volume_stored_three_ways_gives_equal_features(variants) -> None:
    store = variants["features"]
    ref = store["lps"]
    provenance = zarr.open_group(str(variants["tmp"] / "features.zarr"), mode="r").attrs
    assert provenance["orientation"].startswith("LPS") and "trilinear" in provenance["resampling"]
    for name in VARIANTS:
        got = store[name]
        assert set(got) == set(ref)
        for key in ref:
            assert np.allclose(np.asarray(got[key], np.float64), np.asarray(ref[key], np.float64), atol=1e-5), \
                (name, key)
    assert np.asarray(ref["mask_present"])[TOKEN_MASKS.index("lung")]
