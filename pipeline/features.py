"""Features stage: frozen 2D encoder on every slice, R2 / LITA token pooling, mask pooling -> Zarr.

Per volume (paper Sec. 3.2-3.3; layout in `pipeline.feature_store`):
1. CT: HU window -> min-max to [0, 1] -> trilinear resize to (D, H, W) = (32, 256, 256) -> 3 channels
   -> the processor's mean / std (read from `preprocessor_config.json`, never hard-coded).
   Masks: each token-mask channel resized by area fraction (trilinear on the 0/1 mask), kept where
   the fraction >= `mask_threshold`, so thin structures survive downsampling.
2. Encoder: all D slices in batches, `inference_mode`; hidden states of the configured blocks are
   reduced batch by batch (mask pooling is linear), so no (D x layers x tokens x C) tensor is kept.
3. Pooling: global = per-slice mean of final-layer patch tokens (D tokens); region = for each of the
   s region masks the slice with the largest mask area (R2) or s uniform slices (LITA), its patch grid
   adaptive-average-pooled to `grid` (T / s tokens); mask_pooled = area-normalised mean of each
   level's patch tokens over every slice and patch the mask covers; mask_grid = mask occupancy on a
   small (d, h, w) grid (not re-binarised, as Osprey's spatial input).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr

from pipeline.constants import REGIONS, TOKEN_MASKS
from pipeline.feature_store import write_feature_shard
from pipeline.io import InputError, image_array, read_image, setup_logging
from pipeline.regions import unpack_channel

CODE_VERSION = "features-1"
# RAD-DINO's processor statistics, used only when the demo writes its stand-in encoder folder.
RAD_DINO_MEAN = [0.5307, 0.5307, 0.5307]
RAD_DINO_STD = [0.2583, 0.2583, 0.2583]


@dataclass(frozen=True)
class FeatureConfig:
    input_size: tuple[int, int, int] = (32, 256, 256)  # D, H, W
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    layers: tuple[int, ...] = (3, 6, 9, 12)
    pooling: str = "r2"  # r2 | lita
    region_grid: tuple[int, int] = (6, 9)  # pooled grid per representative slice
    mask_grid: tuple[int, int, int] = (8, 16, 16)
    mask_threshold: float = 0.25
    batch_size: int = 32
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def n_slow(self) -> int:
        return len(REGIONS)


class EncoderError(RuntimeError):
    """The encoder weights are missing or unusable."""


def load_encoder(path: str | Path, revision: str | None = None) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """Dinov2 + its processor mean/std from a local folder (or the local HF cache for a hub id)."""
    from transformers import Dinov2Model

    try:
        model = Dinov2Model.from_pretrained(str(path), revision=revision, local_files_only=True)
    except OSError as exc:
        raise EncoderError(
            f"encoder weights not found at {path!r} (offline). Download once with "
            f"`hf download microsoft/rad-dino --local-dir <folder>` and point features.encoder.path "
            f"at that folder. ({exc})"
        ) from None
    proc_file = Path(path) / "preprocessor_config.json"
    if proc_file.is_file():
        proc = json.loads(proc_file.read_text())
    else:
        from transformers import AutoImageProcessor

        p = AutoImageProcessor.from_pretrained(str(path), revision=revision, local_files_only=True)
        proc = {"image_mean": p.image_mean, "image_std": p.image_std}
    mean = np.asarray(proc["image_mean"], dtype=np.float32)
    std = np.asarray(proc["image_std"], dtype=np.float32)
    return model.eval().requires_grad_(False), mean, std


def build_demo_encoder(out_dir: Path, hidden_size: int = 64, layers: int = 4, heads: int = 4, seed: int = 0) -> None:
    """A randomly initialised Dinov2 (patch 14, no registers) saved like a hub folder, for the demo.

    `hidden_size=768, layers=12, heads=12` gives RAD-DINO's exact architecture for cost benchmarks.
    """
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from pipeline.io import atomic_output

    torch.manual_seed(seed)
    config = Dinov2Config(
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        mlp_ratio=4,
        patch_size=14,
        image_size=518,
        layer_norm_eps=1e-6,
    )
    processor = BitImageProcessor(
        image_mean=RAD_DINO_MEAN,
        image_std=RAD_DINO_STD,
        size={"shortest_edge": 518},
        crop_size={"height": 518, "width": 518},
    )
    with atomic_output(out_dir) as tmp:
        Dinov2Model(config).save_pretrained(tmp)
        processor.save_pretrained(tmp)


def preprocess_ct(ct: np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """(z, y, x) HU -> (D, H, W) in [0, 1]."""
    lo, hi = cfg.hu_window
    x = torch.from_numpy(np.clip(ct.astype(np.float32), lo, hi))
    x = (x - lo) / (hi - lo)
    x = F.interpolate(x[None, None], size=cfg.input_size, mode="trilinear", align_corners=False)[0, 0]
    return x.clamp_(0, 1)


def resize_masks(labels: np.ndarray, cfg: FeatureConfig) -> torch.Tensor:
    """Token masks (M, D, H, W) as area fractions on the encoder's input grid."""
    masks = np.stack([unpack_channel(labels, m) for m in TOKEN_MASKS]).astype(np.float32)
    t = torch.from_numpy(masks)[None]
    return F.interpolate(t, size=cfg.input_size, mode="trilinear", align_corners=False)[0]


def select_slices(region_area: torch.Tensor, pooling: str, depth: int) -> tuple[list[int], list[bool]]:
    """Representative slice per region: largest mask area (R2), or uniform (LITA).

    An empty region falls back to the middle slice and is reported as not present.
    """
    s = region_area.shape[0]
    present = [bool(region_area[r].sum() > 0) for r in range(s)]
    if pooling == "lita":
        return [int(round(v)) for v in np.linspace(0, depth - 1, s)], present
    if pooling != "r2":
        raise ValueError(f"unknown pooling mode {pooling!r} (r2 or lita)")
    return [int(region_area[r].argmax()) if present[r] else depth // 2 for r in range(s)], present


@torch.inference_mode()
def encode_volume(
    encoder: torch.nn.Module,
    mean: np.ndarray,
    std: np.ndarray,
    ct: np.ndarray,
    labels: np.ndarray,
    cfg: FeatureConfig,
) -> dict[str, np.ndarray]:
    device = next(encoder.parameters()).device
    vol = preprocess_ct(ct, cfg)  # D, H, W
    frac = resize_masks(labels, cfg)  # M, D, H, W
    binary = frac >= cfg.mask_threshold
    depth = vol.shape[0]
    patch = encoder.config.patch_size
    gh, gw = vol.shape[1] // patch, vol.shape[2] // patch
    # Masks on the patch grid, binarised (> 0) and area-normalised, as Osprey's mask pooling.
    on_patches = F.adaptive_avg_pool2d(binary.float().flatten(0, 1), (gh, gw)).view(len(TOKEN_MASKS), depth, gh * gw) > 0
    weights = on_patches.float()
    area = weights.sum(dim=(1, 2))
    m_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    c = encoder.config.hidden_size
    pooled_sum = torch.zeros(len(TOKEN_MASKS), len(cfg.layers), c)
    final_tokens = torch.empty(depth, gh * gw, c)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for start in range(0, depth, cfg.batch_size):
        stop = min(start + cfg.batch_size, depth)
        pixels = ((vol[start:stop, None].expand(-1, 3, -1, -1).to(device)) - m_t) / s_t
        with autocast:
            out = encoder(pixel_values=pixels, output_hidden_states=True)
        final_tokens[start:stop] = out.last_hidden_state[:, 1:].float().cpu()
        w = weights[:, start:stop].flatten(1)  # M, b*P
        for li, layer in enumerate(cfg.layers):
            h = out.hidden_states[layer][:, 1:].float().cpu().flatten(0, 1)  # b*P, C
            pooled_sum[:, li] += w @ h
    mask_pooled = pooled_sum / (area.view(-1, 1, 1) + 1e-8)

    region_area = binary[: len(REGIONS)].sum(dim=(2, 3)).float()  # s, D
    slices, _ = select_slices(region_area, cfg.pooling, depth)
    grids = final_tokens[slices].view(len(slices), gh, gw, c).permute(0, 3, 1, 2)
    region = F.adaptive_avg_pool2d(grids, cfg.region_grid).flatten(2).transpose(1, 2).reshape(-1, c)
    mask_grid = F.adaptive_avg_pool3d(binary.float()[None], cfg.mask_grid)[0]
    return {
        "global": final_tokens.mean(dim=1).numpy(),
        "region": region.numpy(),
        "mask_pooled": mask_pooled.numpy(),
        "mask_grid": mask_grid.numpy(),
        "region_slices": np.asarray(slices, dtype=np.int16),
        "mask_present": (area > 0).numpy(),
    }


def run_shard(
    manifest: pd.DataFrame,
    shard: int,
    masks_zarr: Path,
    encoder_path: str,
    revision: str | None,
    cfg: FeatureConfig,
    out: Path,
    on_error: str = "fail",
    threads: int = 1,
) -> list[str]:
    log = setup_logging()
    torch.set_num_threads(max(1, threads))
    encoder, mean, std = load_encoder(encoder_path, revision)
    if torch.cuda.is_available():
        encoder = encoder.cuda()
    n_layers = encoder.config.num_hidden_layers
    bad = [layer for layer in cfg.layers if not 1 <= layer <= n_layers]
    if bad:
        raise ValueError(f"features.layers {list(cfg.layers)}: blocks {bad} outside 1..{n_layers} of {encoder_path}")
    masks = zarr.open_group(str(masks_zarr), mode="r")
    have_masks = set(masks.attrs["volume_ids"])
    rows = manifest[manifest["shard"] == shard]
    ids: list[str] = []
    per_volume: list[dict[str, np.ndarray]] = []
    t0 = time.perf_counter()
    for i, row in enumerate(rows.itertuples(index=False), 1):
        if row.volume_id not in have_masks:
            log.warning("volume %s has no masks (failed in the regions stage): skipped", row.volume_id)
            continue
        try:
            image = read_image(row.ct_path, row.volume_id)
            ct = image_array(image, row.ct_path, row.volume_id, np.float32)
            labels = np.asarray(masks[row.volume_id][...])
            if labels.shape != ct.shape:
                raise InputError(f"volume {row.volume_id}: CT {row.ct_path} has shape {ct.shape}, "
                                 f"masks {labels.shape}")
        except InputError as exc:
            if on_error != "skip":
                raise
            log.error("%s (skipped)", exc)
            continue
        per_volume.append(encode_volume(encoder, mean, std, ct, labels, cfg))
        ids.append(row.volume_id)
        rate = i / (time.perf_counter() - t0)
        log.info("[%d/%d] %s encoded (%.2f volumes/s)", i, len(rows), row.volume_id, rate)
    arrays = {k: np.stack([v[k] for v in per_volume]) if per_volume else np.zeros((0,)) for k in
              ("global", "region", "mask_pooled", "mask_grid", "region_slices", "mask_present")}
    attrs = {
        "encoder": str(encoder_path),
        "revision": revision,
        "hidden_size": int(encoder.config.hidden_size),
        "patch_size": int(encoder.config.patch_size),
        "input_size": list(cfg.input_size),
        "hu_window": list(cfg.hu_window),
        "layers": list(cfg.layers),
        "pooling": cfg.pooling,
        "region_grid": list(cfg.region_grid),
        "mask_grid": list(cfg.mask_grid),
        "masks": list(TOKEN_MASKS),
        "code_version": CODE_VERSION,
    }
    write_feature_shard(out, ids, arrays, attrs)
    return ids


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encode", help="encode one shard")
    enc.add_argument("--manifest", type=Path, required=True)
    enc.add_argument("--shard", type=int, required=True)
    enc.add_argument("--masks", type=Path, required=True)
    enc.add_argument("--encoder", required=True)
    enc.add_argument("--revision")
    enc.add_argument("--params-json", required=True, help="FeatureConfig fields as JSON")
    enc.add_argument("--out", type=Path, required=True)
    enc.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    enc.add_argument("--threads", type=int, default=1)
    demo = sub.add_parser("demo-encoder", help="write a random-initialised Dinov2 folder")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument("--hidden-size", type=int, default=64)
    demo.add_argument("--layers", type=int, default=4)
    demo.add_argument("--heads", type=int, default=4)
    demo.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.command == "demo-encoder":
        build_demo_encoder(args.out, args.hidden_size, args.layers, args.heads, args.seed)
        return
    p = json.loads(args.params_json)
    cfg = FeatureConfig(
        input_size=tuple(p.get("input_size", (32, 256, 256))),
        hu_window=tuple(p.get("hu_window", (-1000.0, 1000.0))),
        layers=tuple(p.get("layers", (3, 6, 9, 12))),
        pooling=p.get("pooling", "r2"),
        region_grid=tuple(p.get("region_grid", (6, 9))),
        mask_grid=tuple(p.get("mask_grid", (8, 16, 16))),
        mask_threshold=float(p.get("mask_threshold", 0.25)),
        batch_size=int(p.get("batch_size", 32)),
    )
    run_shard(pd.read_parquet(args.manifest), args.shard, args.masks, args.encoder, args.revision, cfg,
              args.out, args.on_error, args.threads)


if __name__ == "__main__":
    main()
