"""The feature cache: one Zarr v3 group per shard, one chunk per volume per array.

Layout of `shard-<k>.zarr` (N = volumes in the shard, D slices, T region tokens, C encoder width,
M token masks, L levels, s representative slices):

    global         float16 (N, D, C)        per-slice mean of final-layer patch tokens
    region         float16 (N, T, C)        R2 / LITA region tokens
    mask_pooled    float16 (N, M, L, C)     area-normalised mask pooling per level
    mask_grid      float16 (N, M, d, h, w)  mask occupancy on a small grid (spatial token input)
    region_slices  int16   (N, s)           slice picked per region token group
    mask_present   bool    (N, M)           False where the mask is empty

Group attributes: `volume_ids` (row order) and the provenance of the numbers (encoder, layers, pooling,
input size, code version). `model/` reads only this and never raw CT.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

FEATURE_ARRAYS: tuple[str, ...] = (
    "global",
    "region",
    "mask_pooled",
    "mask_grid",
    "region_slices",
    "mask_present",
)
_DTYPES = {
    "global": np.float16,
    "region": np.float16,
    "mask_pooled": np.float16,
    "mask_grid": np.float16,
    "region_slices": np.int16,
    "mask_present": np.bool_,
}


class FeatureStoreError(RuntimeError):
    """A feature shard is missing, incomplete or inconsistent."""


def write_feature_shard(
    path: Path,
    volume_ids: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
) -> None:
    """Write one shard atomically: into `<path>.tmp`, then renamed into place."""
    path = Path(path)
    missing = set(FEATURE_ARRAYS) - set(arrays)
    if missing:
        raise FeatureStoreError(f"{path}: arrays missing: {sorted(missing)}")
    n = len(volume_ids)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
    for name in FEATURE_ARRAYS:
        data = np.asarray(arrays[name]).astype(_DTYPES[name], copy=False)
        if data.shape[0] != n:
            raise FeatureStoreError(f"{path}: array {name} has {data.shape[0]} rows for {n} volumes")
        chunks = (1, *data.shape[1:])
        arr = group.create_array(name, shape=data.shape, chunks=chunks, dtype=data.dtype)
        if n:
            arr[...] = data
    group.attrs.update({**attrs, "volume_ids": list(volume_ids), "complete": True})
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


class FeatureStore:
    """Lazy reader over many shards: `store[volume_id]` -> dict of arrays of that volume."""

    def __init__(self, shard_paths: Iterable[Path]):
        self._groups: list[zarr.Group] = []
        self._index: dict[str, tuple[int, int]] = {}
        self.attrs: dict[str, Any] = {}
        for path in sorted(Path(p) for p in shard_paths):
            try:
                group = zarr.open_group(str(path), mode="r")
            except Exception as exc:  # zarr raises several types for a broken store
                raise FeatureStoreError(f"{path}: cannot open feature shard ({exc})") from exc
            if not group.attrs.get("complete", False):
                raise FeatureStoreError(f"{path}: feature shard is incomplete")
            gi = len(self._groups)
            self._groups.append(group)
            for row, vid in enumerate(group.attrs["volume_ids"]):
                if vid in self._index:
                    raise FeatureStoreError(f"{path}: volume {vid} is also in another shard")
                self._index[vid] = (gi, row)
            if not self.attrs:
                self.attrs = {k: v for k, v in group.attrs.items() if k != "volume_ids"}

    @property
    def volume_ids(self) -> list[str]:
        return list(self._index)

    def __contains__(self, volume_id: str) -> bool:
        return volume_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, volume_id: str) -> dict[str, np.ndarray]:
        try:
            gi, row = self._index[volume_id]
        except KeyError:
            raise FeatureStoreError(f"volume {volume_id} is not in the feature cache") from None
        group = self._groups[gi]
        return {name: np.asarray(group[name][row]) for name in FEATURE_ARRAYS}
