"""One orientation for every CT and its masks: LPS in ITK's sense (identity direction).

The canonical array (z, y, x) has x running to the patient's left, y to posterior and z to superior:
ITK's / SimpleITK's identity direction matrix, DICOM's patient coordinate system, and what the demo
cohort and RadGenome's NIfTI volumes are written in. The regions stage stores masks on this grid
(`origin`, `spacing`, `direction` of the canonical grid) and the features stage brings each CT onto it
before resizing, so the slice choice, the mask grid and the encoder's input do not depend on how a
scanner or exporter ordered the voxels.

Reorientation is exact: an axis permutation plus flips (numpy views; no resampling). Each array axis
goes to the patient axis its direction cosine points along most; a residual oblique rotation (a tilted
gantry, a rotated reconstruction) stays in the direction matrix, which is then near, not equal to,
the identity.

Written here rather than taken from SimpleITK's `DICOMOrient`: that works on whole `sitk.Image`s, while
the regions stage holds a packed uint32 numpy array and per-channel bounding boxes that must follow
the same permutation; the rule is a few lines and shared by both stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CANONICAL = "LPS"  # ITK's identity direction: +x patient left, +y posterior, +z superior


@dataclass(frozen=True)
class Reorientation:
    """How to bring a grid to the canonical orientation.

    `axes[i]`: the source index axis (x=0, y=1, z=2) that becomes canonical axis i; `flip[i]`: whether
    it runs against the canonical direction.
    """

    axes: tuple[int, int, int]
    flip: tuple[bool, bool, bool]

    @property
    def identity(self) -> bool:
        return self.axes == (0, 1, 2) and not any(self.flip)

    def array(self, zyx: np.ndarray) -> np.ndarray:
        """A (z, y, x) array on the canonical grid: a view (transpose + reversed strides), no copy."""
        if self.identity:
            return zyx
        # numpy axis of source index axis a is 2 - a; canonical numpy axis k holds canonical axis 2 - k
        out = np.transpose(zyx, [2 - self.axes[2 - k] for k in range(3)])
        flips = tuple(slice(None, None, -1) if self.flip[2 - k] else slice(None) for k in range(3))
        return out[flips]

    def size(self, size_xyz: Sequence[int]) -> tuple[int, int, int]:
        return tuple(int(size_xyz[a]) for a in self.axes)  # type: ignore[return-value]

    def grid(self, size_xyz: Sequence[int], spacing: Sequence[float], origin: Sequence[float],
             direction: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
        """(size, spacing, origin, direction) of the canonical grid, SimpleITK x, y, z order: the same
        physical voxels (origin = the physical centre of the canonical first voxel)."""
        d = np.asarray(direction, float).reshape(3, 3)
        sp = np.asarray(spacing, float)
        o = np.asarray(origin, float)
        new_d = np.zeros((3, 3))
        for i, (a, f) in enumerate(zip(self.axes, self.flip)):
            new_d[:, i] = -d[:, a] if f else d[:, a]
            if f:  # the canonical first voxel is the source's last along that axis
                o = o + (int(size_xyz[a]) - 1) * sp[a] * d[:, a]
        return (self.size(size_xyz), tuple(float(sp[a]) for a in self.axes), tuple(float(v) for v in o),
                tuple(float(v) for v in new_d.reshape(-1)))

    def box(self, box_zyx: Sequence[int], shape_zyx: Sequence[int]) -> list[int]:
        """A [z0, z1, y0, y1, x0, x1] box of the source (z, y, x) array, on the canonical array."""
        lo_hi = {2 - k: (int(box_zyx[2 * k]), int(box_zyx[2 * k + 1]), int(shape_zyx[k])) for k in range(3)}  # by x, y, z
        out: list[int] = []
        for k in range(3):  # canonical numpy axis k = canonical axis 2 - k
            i = 2 - k
            lo, hi, n = lo_hi[self.axes[i]]
            out += [n - hi, n - lo] if self.flip[i] else [lo, hi]
        return out


def reorientation(direction: Sequence[float]) -> Reorientation:
    """The permutation and flips that bring a grid with this direction matrix (row-major 3 x 3, columns
    = the physical directions of the index axes x, y, z) nearest to the identity.

    Each index axis goes to the patient axis its column points along most; a direction whose columns
    do not point along three different patient axes (degenerate, or 45 degrees oblique) is refused.
    """
    if len(direction) != 9:
        raise ValueError(f"direction matrix {list(direction)} is not 3 x 3")
    d = np.asarray(direction, float).reshape(3, 3)
    if not np.all(np.isfinite(d)):
        raise ValueError(f"direction matrix {list(direction)} is not finite")
    target = [int(np.argmax(np.abs(d[:, a]))) for a in range(3)]  # index axis a -> patient axis
    if sorted(target) != [0, 1, 2]:
        raise ValueError(f"direction matrix {list(direction)} does not map the index axes to three distinct "
                         "patient axes (degenerate or 45 degrees oblique)")
    axes = [0, 0, 0]
    flip = [False, False, False]
    for a, i in enumerate(target):
        axes[i] = a
        flip[i] = bool(d[i, a] < 0)
    return Reorientation((axes[0], axes[1], axes[2]), (flip[0], flip[1], flip[2]))


def to_canonical(zyx: np.ndarray, direction: Sequence[float]) -> np.ndarray:
    """A (z, y, x) array with this direction, on the canonical grid (a view when nothing moves)."""
    return reorientation(direction).array(zyx)
