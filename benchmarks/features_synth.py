"""Synthetic RadGenome-sized inputs for the features benchmarks (imported by features_*.py, gpu_features.py).

A volume is 110 x 360 x 360 voxels (RadGenome after SAT's 1 x 1 x 3 mm resampling and foreground crop):
body, lungs, airway, heart, spine and ribs, upper abdomen, a nodule, a cyst, an effusion as ellipsoids,
with noise so that the .nii.gz compresses like a CT rather than like a constant. The masks are written
in the regions stage's layout (one bit-packed uint32 array per volume in a Zarr group).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.constants import CHANNELS

SHAPE = (110, 360, 360)


def _ellipsoid(shape, centre, radii):
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (xx - centre[2]) / radii[2]) ** 2 <= 1


def synthetic_volume(seed: int, shape=SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """(CT int16 HU, bit-packed uint32 labels) on the same (z, y, x) grid."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    j = rng.uniform(-0.05, 0.05, 3) + 1
    ct = np.full(shape, -1000, np.float32)
    labels = np.zeros(shape, np.uint32)

    def put(name, m, hu=None):
        labels[m] |= np.uint32(1 << CHANNELS.index(name))
        if hu is not None:
            ct[m] = hu

    body = _ellipsoid(shape, (z / 2, y / 2, x / 2), (z * 0.7, y * 0.42 * j[0], x * 0.47 * j[1]))
    ct[body] = 40
    put("abdomen", body & (np.arange(z)[:, None, None] < z * 0.25))
    for side in (-1, 1):
        put("lung", _ellipsoid(shape, (z * 0.55, y * 0.45, x / 2 + side * x * 0.2), (z * 0.4, y * 0.28, x * 0.15)), -850)
    put("airways", _ellipsoid(shape, (z * 0.7, y * 0.4, x / 2), (z * 0.3, y * 0.03, x * 0.03)), -950)
    put("mediastinum", _ellipsoid(shape, (z * 0.6, y * 0.45, x / 2), (z * 0.3, y * 0.12, x * 0.06)))
    put("heart", _ellipsoid(shape, (z * 0.4, y * 0.5, x * 0.55), (z * 0.18 * j[2], y * 0.15, x * 0.13)), 45)
    put("osseous", _ellipsoid(shape, (z / 2, y * 0.78, x / 2), (z * 0.6, y * 0.05, x * 0.04)), 700)
    put("nodule", _ellipsoid(shape, (z * 0.6, y * 0.4, x * 0.32), (1.5, 4, 4)), 30)
    put("cyst", _ellipsoid(shape, (z * 0.15, y * 0.55, x * 0.3), (2.5, 8, 8)), 10)
    put("effusion", _ellipsoid(shape, (z * 0.4, y * 0.68, x * 0.25), (z * 0.15, y * 0.04, x * 0.1)), 15)
    ct += rng.normal(0, 20, shape).astype(np.float32)
    return ct.astype(np.int16), labels


def write_shard_inputs(root: Path, n: int, shape=SHAPE, seed: int = 0) -> tuple[pd.DataFrame, Path]:
    """n synthetic volumes as .nii.gz + a masks Zarr shard + a manifest (shard 0); returns (manifest, masks)."""
    import SimpleITK as sitk
    import zarr

    root.mkdir(parents=True, exist_ok=True)
    masks = root / "masks.zarr"
    group = zarr.open_group(str(masks), mode="w", zarr_format=3)
    rows = []
    for i in range(n):
        vid = f"synth_{i}"
        ct, labels = synthetic_volume(seed + i, shape)
        image = sitk.GetImageFromArray(ct)
        image.SetSpacing((1.0, 1.0, 3.0))
        path = root / f"{vid}.nii.gz"
        sitk.WriteImage(image, str(path), useCompression=True)
        group.create_array(vid, shape=labels.shape, chunks=labels.shape, dtype=np.uint32)[...] = labels
        rows.append({"volume_id": vid, "shard": 0, "ct_path": str(path)})
    group.attrs.update({"volume_ids": [r["volume_id"] for r in rows], "channels": list(CHANNELS), "complete": True})
    return pd.DataFrame(rows), masks
