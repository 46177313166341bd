"""The CT's grid from its header alone (no voxels read), and the memory a merge of it needs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io import InputError, check_memory, read_header_info, read_nifti_header

DEFAULT_MEMORY_CAP_GB = 8.0


@dataclass
class CtGrid:
    """The CT's geometry from its header only (no voxels read)."""

    size: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    nifti_key: bytes | None  # NIfTI geometry fields, to recognise masks written on the same grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    def geometry(self) -> dict[str, list[float]]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    def matches(self, reader: sitk.ImageFileReader | sitk.Image) -> bool:
        return (
            tuple(reader.GetSize()) == self.size
            and np.allclose(reader.GetSpacing(), self.spacing, atol=1e-4)
            and np.allclose(reader.GetOrigin(), self.origin, atol=1e-3)
            and np.allclose(reader.GetDirection(), self.direction, atol=1e-4)
        )

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _bounds(self.size, self.origin, self.spacing, self.direction)


def _bounds(size, origin, spacing, direction) -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (x, y, z mm) of the voxel extents of a grid."""
    d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).T.reshape(-1, 3)
    pts = np.asarray(origin, float) + corners @ d.T
    return pts.min(0), pts.max(0)


def bytes_per_voxel(threads: int) -> float:
    """Peak bytes per CT voxel of merging one volume: labels + per-thread accumulators and buffers."""
    return 4 + 4 + max(1, threads) * (3 + 2)


def read_ct_grid(ct_path: Path, volume_id: str, memory_cap_bytes: int | None = None, threads: int = 1) -> CtGrid:
    reader = read_header_info(ct_path, volume_id)
    if reader.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {ct_path} is {reader.GetDimension()}D, expected a 3D CT")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"volume {volume_id}: {ct_path} has {reader.GetNumberOfComponents()} components per "
                         "voxel, expected a scalar CT")
    check_memory(reader, ct_path, volume_id, memory_cap_bytes, bytes_per_voxel(threads))
    key = None
    if ct_path.name.endswith((".nii", ".nii.gz")):
        hdr = read_nifti_header(ct_path, volume_id)
        key = hdr.geometry_key if hdr is not None and len(hdr.dims) == 3 else None
    return CtGrid(tuple(int(s) for s in reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                  tuple(reader.GetDirection()), key)


def read_ct_header(ct_path: Path, volume_id: str) -> CtGrid:
    """The CT's geometry from its header (kept for callers of the old name)."""
    return read_ct_grid(Path(ct_path), volume_id)
