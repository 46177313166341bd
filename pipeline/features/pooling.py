"""Token pooling (MedRegion-CT paper, Sec. 3.2-3.3), as pure functions on tensors.

- global: per slice, the mean of its final-layer patch tokens -> D tokens.
- region (R2): for each region mask the slice with the most mask pixels (first such slice on a tie);
  its (gh x gw) patch grid adaptive-average-pooled to (h x w) with s * h * w = T -> T tokens, region
  order, row-major inside a slice. An empty region falls back to the middle slice (D // 2) and is
  flagged False in `mask_present`.
- region (lita, the paper's Ablation-LITA): s slices chosen uniformly, round(linspace(0, D - 1, s))
  (LITA's rule), pooled the same way.
- mask pooling: for each mask and level, the area-normalised mean of the level's patch tokens over
  every (slice, patch) the mask touches (Osprey: mask on the feature grid, binarised, / (area + 1e-8)).

The streaming encoder (`pipeline.features.encode`) computes the same quantities batch by batch; the
re-pooling rule calls these functions on cached final-layer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

EPS = 1e-8


def select_slices(
    region_area: torch.Tensor | np.ndarray, pooling: str, depth: int, s: int | None = None
) -> tuple[list[int], list[bool]]:
    """Representative slices: largest mask area per region (r2) or s uniform slices (lita).

    `region_area` is (R, D): pixels of each region mask per slice. Returns (slices, present) where
    present[r] is False for an empty region (r2 then uses the middle slice).
    """
    area = torch.as_tensor(region_area).double()
    present = [bool(area[r].sum() > 0) for r in range(area.shape[0])]
    if pooling == "lita":
        s = area.shape[0] if s is None else int(s)
        return [int(v) for v in np.round(np.linspace(0, depth - 1, s))], present
    if pooling != "r2":
        raise ValueError(f"unknown pooling mode {pooling!r} (r2 or lita)")
    if s is not None and s != area.shape[0]:
        raise ValueError(f"r2 pooling picks one slice per region: s = {s} but {area.shape[0]} regions")
    return [int(area[r].argmax()) if present[r] else depth // 2 for r in range(area.shape[0])], present


def pool_region(grids: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(s, gh, gw, C) patch grids of the chosen slices -> (s * h * w, C) region tokens."""
    s, gh, gw, c = grids.shape
    pooled = F.adaptive_avg_pool2d(grids.permute(0, 3, 1, 2).float(), tuple(grid))  # s, C, h, w
    return pooled.permute(0, 2, 3, 1).reshape(-1, c)


def global_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """(D, P, C) final-layer patch tokens -> (D, C)."""
    return tokens.float().mean(dim=1)


def mask_pool(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(D, P, C) level tokens, (M, D, P) 0/1 patch masks -> (M, C) area-normalised mask means."""
    w = weights.float().flatten(1)
    return (w @ tokens.float().flatten(0, 1)) / (w.sum(dim=1, keepdim=True) + EPS)


def pool_tokens(
    tokens: torch.Tensor,
    patch_grid: Sequence[int],
    region_area: torch.Tensor | np.ndarray,
    pooling: str,
    s: int | None,
    grid: Sequence[int],
) -> dict[str, np.ndarray]:
    """Global + region tokens of one volume from its (D, P, C) final-layer tokens."""
    d, p, c = tokens.shape
    gh, gw = patch_grid
    if gh * gw != p:
        raise ValueError(f"{p} tokens per slice is not a {gh} x {gw} grid")
    slices, _ = select_slices(region_area, pooling, d, s)
    grids = tokens[slices].float().view(len(slices), gh, gw, c)
    return {
        "global": global_tokens(tokens).numpy(),
        "region": pool_region(grids, grid).numpy(),
        "region_slices": np.asarray(slices, dtype=np.int16),
    }
