"""The encoder step: all D slices of a volume in batched forwards, pooled while they pass.

Per batch of slices: one forward in `inference_mode` (bf16 autocast on CUDA, fp32 on CPU). Forward
hooks on the configured blocks mask-pool each block's output the moment it is computed (pooling is
linear: per-batch weighted sums, divided by the mask areas at the end), so no block output outlives
its layer and `output_hidden_states` (13 tensors per batch) is never requested. From the final,
layer-normed tokens only the per-slice means and the grids of the s representative slices (known
from the masks before encoding) are kept, plus, for the raw-token cache, the tokens in fp16.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

from pipeline.constants import TOKEN_MASKS
from pipeline.features.config import FeatureConfig
from pipeline.features.pooling import EPS, pool_region, select_slices
from pipeline.features.preprocess import PreparedVolume, prepare_volume


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _blocks(encoder: torch.nn.Module) -> torch.nn.ModuleList:
    try:
        return encoder.encoder.layer  # Dinov2Model
    except AttributeError:
        raise TypeError(f"{type(encoder).__name__} is not a Dinov2Model (no .encoder.layer)") from None


@torch.inference_mode()
def encode_prepared(
    encoder: torch.nn.Module,
    mean: np.ndarray,
    std: np.ndarray,
    prep: PreparedVolume,
    cfg: FeatureConfig,
    keep_raw: bool = False,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(features of `pipeline.feature_store.FEATURE_ARRAYS`, raw-token arrays or None)."""
    device = next(encoder.parameters()).device
    patch = int(encoder.config.patch_size)
    c = int(encoder.config.hidden_size)
    gh, gw = cfg.patch_grid(patch)
    grid = cfg.pooled_grid(patch)
    p = gh * gw
    depth = prep.pixels.shape[0]
    m = prep.patch_masks.shape[0]
    slices, _ = select_slices(prep.region_area, cfg.pooling, depth, cfg.n_slices)
    wanted = set(slices)

    weights = prep.patch_masks.to(device).flatten(1)  # M, D*P
    area = weights.sum(dim=1)
    pooled = torch.zeros(m, len(cfg.layers), c, device=device)
    current: dict[str, torch.Tensor] = {}

    def hook(li: int):
        def fn(module: torch.nn.Module, args: Any, output: Any) -> None:
            h = output[0] if isinstance(output, tuple) else output
            with torch.autocast(device.type, enabled=False):  # fp32 sums over ~10^4 tokens
                pooled[:, li] += current["w"] @ h[:, 1:].reshape(-1, c).float()

        return fn

    blocks = _blocks(encoder)
    handles = [blocks[layer - 1].register_forward_hook(hook(li)) for li, layer in enumerate(cfg.layers)]
    m_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    channels = m_t.shape[1]
    glob = torch.empty(depth, c, device=device)
    keep: dict[int, torch.Tensor] = {}
    raw = torch.empty(depth, p, c, dtype=torch.float16) if keep_raw else None
    try:
        for start in range(0, depth, cfg.batch_size):
            stop = min(start + cfg.batch_size, depth)
            x = prep.pixels[start:stop].to(device, non_blocking=True)
            x = x[:, None].expand(-1, channels, -1, -1) if x.ndim == 3 else x  # one window: grey in every channel
            x = (x - m_t) / s_t
            current["w"] = weights[:, start * p : stop * p]
            with _autocast(device):
                last = encoder(pixel_values=x).last_hidden_state[:, 1:]
            if last.shape[1] != p:
                raise RuntimeError(f"encoder returned {last.shape[1]} patch tokens per slice, expected {gh} x {gw}")
            last = last.float()
            glob[start:stop] = last.mean(dim=1)
            for d in range(start, stop):
                if d in wanted:
                    keep[d] = last[d - start].clone()
            if raw is not None:
                raw[start:stop] = last.to(torch.float16).cpu()
    finally:
        for h in handles:
            h.remove()
    grids = torch.stack([keep[d] for d in slices]).view(len(slices), gh, gw, c)
    features = {
        "global": glob.cpu().numpy(),
        "region": pool_region(grids, grid).cpu().numpy(),
        "mask_pooled": (pooled / (area.view(-1, 1, 1) + EPS)).cpu().numpy(),
        "mask_grid": prep.mask_grid.numpy(),
        "region_slices": np.asarray(slices, dtype=np.int16),
        "mask_present": np.asarray(prep.mask_present, dtype=bool),
    }
    raw_arrays = None
    if raw is not None:
        raw_arrays = {
            "tokens": raw.numpy(),
            "region_area": prep.region_area.numpy(),
            "mask_pooled": features["mask_pooled"],
            "mask_grid": features["mask_grid"],
            "mask_present": features["mask_present"],
        }
    return features, raw_arrays


def encode_volume(
    encoder: torch.nn.Module,
    mean: np.ndarray,
    std: np.ndarray,
    ct: np.ndarray,
    labels: np.ndarray,
    cfg: FeatureConfig,
) -> dict[str, np.ndarray]:
    """One volume, CT (z, y, x) in HU + bit-packed masks on the same grid -> its cached arrays."""
    prep = prepare_volume(ct, labels, cfg, int(encoder.config.patch_size))
    assert prep.patch_masks.shape[0] == len(TOKEN_MASKS)
    return encode_prepared(encoder, mean, std, prep, cfg)[0]
