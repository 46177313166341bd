"""Masks to open in a viewer: `pipeline.export_masks` writes the regions and lesions as NIfTI label maps on
the CT's own grid (also for a CT stored with permuted and flipped axes), read back here with SimpleITK and
compared voxel by voxel with the structure files they came from and with the regions stage's Zarr store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from helpers import REPO

from pipeline import export_masks, regions
from pipeline.constants import LESIONS, REGIONS
from pipeline.label_colours import LESION_COLOURS, REGION_COLOURS, rgb

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
NAMES = ["right lung upper lobe", "left lung lower lobe", "trachea", "left heart ventricle", "liver", "rib 3",
         "lung nodule", "lung effusion", "aorta"]
# index x -> patient posterior, index y -> patient right, z unchanged: permuted and flipped (a proper rotation)
ROTATED = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def _write(path: Path, array: np.ndarray, direction) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path), useCompression=True)


def _cohort(tmp: Path, direction) -> tuple[Path, dict[str, np.ndarray], pd.DataFrame]:
    rng = np.random.default_rng(4)
    shape = (14, 23, 31)
    _write(tmp / "ct.nii.gz", rng.integers(-1000, 1000, shape).astype(np.int16), direction)
    masks = {}
    for name in NAMES:
        m = np.zeros(shape, np.uint8)
        z, y, x = rng.integers(0, 8, 3)
        m[z : z + rng.integers(2, 7), y : y + rng.integers(3, 15), x : x + rng.integers(3, 20)] = 1
        masks[name] = m
        _write(tmp / "seg_v1" / f"{name}.nii.gz", m, direction)
    manifest = pd.DataFrame([{"volume_id": "v1", "patient_id": "p1", "split": "train", "shard": 0,
                              "ct_path": str(tmp / "ct.nii.gz"), "mask_dir": str(tmp / "seg_v1"),
                              "mask_source": "precomputed", "findings": "", "impressions": ""}])
    regions.run_shard(manifest, 0, TABLE, tmp / "masks.zarr", tmp / "qc.parquet")
    return tmp / "masks.zarr", masks, manifest


def _expected_code(masks: dict[str, np.ndarray], channels) -> np.ndarray:
    """The label each voxel must get, straight from the structure files and the label table."""
    vocab = TABLE.vocabulary("radgenome")
    from pipeline.constants import CHANNELS

    code = np.zeros(next(iter(masks.values())).shape, np.uint8)
    for name, m in masks.items():
        word = vocab.bits[name]
        for j, c in enumerate(channels):
            if word >> CHANNELS.index(c) & 1:
                code |= (m.astype(np.uint8) << j)
    return code


def test_label_maps_on_the_ct_grid_equal_the_masks_voxel_for_voxel(tmp_path: Path) -> None:
    for direction in ((1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), ROTATED):
        tmp = tmp_path / ("rotated" if direction == ROTATED else "lps")
        store, masks, manifest = _cohort(tmp, direction)
        assert export_masks.export_shard(store, manifest, tmp / "export") == ["v1"]
        ct = sitk.ReadImage(str(tmp / "ct.nii.gz"))
        group = regions.open_masks(store)
        canonical = regions.read_labels(group["v1"])
        for name, channels in (("regions", REGIONS), ("lesions", LESIONS)):
            image = sitk.ReadImage(str(tmp / "export" / "v1" / f"{name}.nii.gz"))
            assert image.GetSize() == ct.GetSize() and image.GetDirection() == ct.GetDirection()
            assert np.allclose(image.GetOrigin(), ct.GetOrigin()) and np.allclose(image.GetSpacing(), ct.GetSpacing())
            got = sitk.GetArrayFromImage(image)
            want = _expected_code(masks, channels)
            assert want.any() and np.array_equal(got, want)
            # the same voxels as the Zarr store, brought to its grid by SimpleITK's own reorientation
            lps = sitk.GetArrayFromImage(sitk.DICOMOrient(image, "LPS"))
            assert np.array_equal(lps, export_masks.channel_code(canonical, channels, list(group.attrs["channels"])))


def test_colour_tables_name_every_label_present(tmp_path: Path) -> None:
    store, masks, manifest = _cohort(tmp_path, ROTATED)
    export_masks.export_shard(store, manifest, tmp_path / "export")
    out = tmp_path / "export" / "v1"
    present = sorted(int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / "regions.nii.gz")))) if v)
    ctbl = [line.split() for line in (out / "regions.ctbl").read_text().splitlines() if not line.startswith("#")]
    assert [int(row[0]) for row in ctbl[1:]] == present and ctbl[0][:2] == ["0", "background"]
    names = {int(row[0]): row[1] for row in ctbl[1:]}
    assert names[1] == "lung" and all(all(p in REGIONS for p in n.split("+")) for n in names.values())
    snap = [line for line in (out / "regions_itksnap.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(snap) == len(present) + 1 and '"lung"' in snap[1]
    assert tuple(int(v) for v in ctbl[1][2:5]) == rgb(REGION_COLOURS["lung"])


def test_colours_stay_visible_on_bone_and_air() -> None:
    for colour in list(REGION_COLOURS.values()) + list(LESION_COLOURS.values()):
        r, g, b = rgb(colour)
        assert max(r, g, b) - min(r, g, b) >= 120, colour  # saturated: not grey, white or black
