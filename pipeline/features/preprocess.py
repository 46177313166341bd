"""CT and masks onto the encoder's input grid: everything the encoder step needs, computed on CPU.

Orientation and spacing: the CT arrives in the canonical orientation (LPS, `pipeline.orientation`; the
features stage turns it as the regions stage turned its masks). It is then resized to (D, H, W) =
`input_size` whatever its spacing: D slices through-plane (z, inferior -> superior) and H x W in-plane
(y anterior -> posterior, x patient right -> left), each axis scaled by its own factor, so the voxel
aspect is not kept and a slice of the encoder's input covers the scan's whole field of view. A 3 mm
scan of 100 slices and a 1 mm scan of 300 slices over the same anatomy give the same D slices; the
same scan with a wider field of view gives smaller anatomy in-plane. The cache's attributes record
this (`orientation`, `resampling`).

CT: trilinear resize to (D, H, W) in HU (`align_corners=False`), then HU clip to `hu_window` and
min-max to [0, 1] with the window's bounds (a constant CT maps to a constant image, no division by
its own range). A volume with fewer than D slices is interpolated up along z (no padding: every slice
the encoder sees is CT).

Masks: each token mask is resized by *area fraction* (the fraction of each output voxel it covers:
box averaging along the axes that shrink, linear interpolation along the axes that grow), then kept
where the fraction >= `mask_threshold`. A structure that is non-empty in the input is never lost: if
no voxel reaches the threshold, the voxels of largest fraction are kept. From the resized masks:
the patch grid occupancy (binarised, as Osprey's mask pooling), region areas per slice (R2's slice
choice) and the mask occupancy grid of the spatial token (fractions, not re-binarised).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.constants import CHANNELS, REGIONS, TOKEN_MASKS
from pipeline.features.config import FeatureConfig


@dataclass
class PreparedVolume:
    """One volume on the encoder's grid (D slices, P = gh * gw patches, M masks, R regions)."""

    volume_id: str
    pixels: torch.Tensor  # (D, H, W) float32 in [0, 1]
    patch_masks: torch.Tensor  # (M, D, P) float32 0 / 1: the mask touches the patch
    region_area: torch.Tensor  # (R, D) float32: mask pixels per slice of each region
    mask_grid: torch.Tensor  # (M, d, h, w) float32 occupancy fractions
    mask_present: np.ndarray  # (M,) bool

    def pin(self) -> PreparedVolume:
        self.pixels = self.pixels.pin_memory()
        return self


def preprocess_ct(ct: np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """(z, y, x) HU -> (D, H, W) float32 in [0, 1]; (D, K, H, W) with K `channel_windows`.

    Resampled in HU first, windowed after: a window is a clip, and clipping before a trilinear
    resize would blur a narrow window's edges differently per channel."""
    x = torch.from_numpy(np.asarray(ct, dtype=np.float32))
    if tuple(x.shape) != tuple(cfg.input_size):
        x = F.interpolate(x[None, None], size=cfg.input_size, mode="trilinear", align_corners=False)[0, 0]
    windows = cfg.channel_windows or (cfg.hu_window,)
    out = [(x.clamp(lo, hi) - lo).mul_(1.0 / (hi - lo)).clamp_(0.0, 1.0) for lo, hi in windows]
    return (out[0] if len(out) == 1 else torch.stack(out, dim=1)).contiguous()


@functools.lru_cache(maxsize=64)
def resample_matrix(n: int, out: int) -> torch.Tensor:
    """(out, n) weights: exact area fractions when shrinking, linear interpolation when growing.

    Shrinking: output voxel o covers [o n / out, (o + 1) n / out) of the input voxels; its weight on
    input voxel i is their overlap divided by the interval's length (rows sum to 1, any ratio).
    Growing: linear interpolation between voxel centres, as `F.interpolate(..., align_corners=False)`.
    """
    w = torch.zeros(out, n, dtype=torch.float64)
    if out <= n:
        f = n / out
        for o in range(out):
            a, b = o * f, (o + 1) * f
            for i in range(int(np.floor(a)), min(n, int(np.ceil(b)))):
                w[o, i] = (min(b, i + 1) - max(a, i)) / f
    else:
        centre = (torch.arange(out, dtype=torch.float64) + 0.5) * (n / out) - 0.5
        centre = centre.clamp(0, n - 1)
        lo = centre.floor().long()
        hi = (lo + 1).clamp(max=n - 1)
        frac = centre - lo
        w[torch.arange(out), lo] += 1 - frac
        w[torch.arange(out), hi] += frac
    return w.float()


def mask_fraction(mask: np.ndarray, size: tuple[int, int, int]) -> torch.Tensor:
    """(z, y, x) bool mask -> (D, H, W) fraction of each output voxel the mask covers.

    Separable: exact area fractions along the axes that shrink, linear interpolation along the
    axes that grow (a volume with fewer slices than D). Three matrix products on the mask's
    bounding box only, so small structures cost little.
    """
    mask = np.asarray(mask, dtype=bool)
    out = torch.zeros(size)
    if not mask.any():
        return out
    box = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hit[0]), int(hit[-1]) + 1))
    (z0, z1), (y0, y1), (x0, x1) = box
    t = torch.from_numpy(mask[z0:z1, y0:y1, x0:x1]).float()
    wz = resample_matrix(mask.shape[0], size[0])[:, z0:z1]
    wy = resample_matrix(mask.shape[1], size[1])[:, y0:y1]
    wx = resample_matrix(mask.shape[2], size[2])[:, x0:x1]
    t = (wz @ t.reshape(z1 - z0, -1)).reshape(size[0], y1 - y0, x1 - x0)
    t = torch.matmul(wy, t)  # D, H, x
    return torch.matmul(t, wx.T).clamp_(0.0, 1.0)


def binarise(frac: torch.Tensor, threshold: float) -> torch.Tensor:
    """fraction >= threshold; a non-empty mask keeps at least its voxels of largest fraction."""
    top = float(frac.max()) if frac.numel() else 0.0
    if top <= 0.0:
        return torch.zeros_like(frac, dtype=torch.bool)
    return frac >= min(threshold, top)


def patch_occupancy(binary: torch.Tensor, patch: int) -> torch.Tensor:
    """(..., H, W) bool -> (..., gh, gw) bool: the mask touches the patch.

    The patch convolution floors: pixels beyond gh * patch (gw * patch) feed no patch. They are
    folded into the last patch row (column) so that a mask there is not lost.
    """
    h, w = binary.shape[-2:]
    gh, gw = h // patch, w // patch
    b = binary[..., : gh * patch, : gw * patch].clone()
    if h > gh * patch:
        b[..., -1, :] |= binary[..., gh * patch :, : gw * patch].any(dim=-2)
    if w > gw * patch:
        b[..., :, -1] |= binary[..., : gh * patch, gw * patch :].any(dim=-1)
        if h > gh * patch:
            b[..., -1, -1] |= binary[..., gh * patch :, gw * patch :].flatten(-2).any(dim=-1)
    return b.reshape(*b.shape[:-2], gh, patch, gw, patch).any(dim=-1).any(dim=-2)


def channel_mask(labels: np.ndarray, channel: str) -> np.ndarray:
    """One channel of the bit-packed uint32 mask array (`pipeline.regions`) as bool."""
    return (labels & np.uint32(1 << CHANNELS.index(channel))) != 0


def prepare_volume(
    ct: np.ndarray, labels: np.ndarray, cfg: FeatureConfig, patch: int, volume_id: str = ""
) -> PreparedVolume:
    """CT + bit-packed masks (same grid) -> `PreparedVolume` for an encoder with `patch`-px patches."""
    if ct.shape != labels.shape:
        raise ValueError(f"volume {volume_id}: CT shape {ct.shape} != mask shape {labels.shape}")
    size = tuple(int(s) for s in cfg.input_size)
    gh, gw = cfg.patch_grid(patch)
    pixels = preprocess_ct(ct, cfg)
    present_bits = int(np.bitwise_or.reduce(labels, axis=None)) if labels.size else 0
    m, d = len(TOKEN_MASKS), size[0]
    patch_masks = torch.zeros(m, d, gh * gw)
    region_area = torch.zeros(len(REGIONS), d)
    mask_grid = torch.zeros(m, *cfg.mask_grid)
    for i, name in enumerate(TOKEN_MASKS):
        if not present_bits & (1 << CHANNELS.index(name)):
            continue  # empty in the input: all zeros
        binary = binarise(mask_fraction(channel_mask(labels, name), size), cfg.mask_threshold)
        patch_masks[i] = patch_occupancy(binary, patch).reshape(d, gh * gw).float()
        if i < len(REGIONS):
            region_area[i] = binary.sum(dim=(1, 2)).float()
        mask_grid[i] = F.adaptive_avg_pool3d(binary.float()[None], cfg.mask_grid)[0]
    present = (patch_masks.sum(dim=(1, 2)) > 0).numpy()
    return PreparedVolume(volume_id, pixels, patch_masks, region_area, mask_grid, present)
