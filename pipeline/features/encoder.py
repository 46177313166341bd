"""The frozen slice encoder: RAD-DINO (or any `Dinov2Model` folder), loaded offline and checked.

`load_encoder` reads a local folder, or a hub id already in the local Hugging Face cache, through
`Dinov2Model.from_pretrained(..., revision=...)`; nothing is downloaded unless asked for. The pixel
normalisation comes from the folder's `preprocessor_config.json` (RAD-DINO: `BitImageProcessor`,
rescale 1/255 then mean / std), never from constants here. Before the weights are read, the folder's
`config.json` is checked against what the config expects (model type, width, depth, patch, the
requested layers), and loading fails on any missing or mis-shaped weight instead of silently
initialising it at random.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# RAD-DINO (microsoft/rad-dino) = DINOv2 ViT-B/14 without registers. Every architecture field is
# spelled out: Dinov2Config's defaults have changed between transformers versions (patch 16 / 14,
# image 224 / 518, eps 1e-12 / 1e-6).
RAD_DINO_ARCH: dict[str, Any] = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
    "hidden_act": "gelu",
    "drop_path_rate": 0.0,
}
# RAD-DINO's processor statistics: used only to write the stand-in encoder's processor config.
RAD_DINO_MEAN = [0.5307, 0.5307, 0.5307]
RAD_DINO_STD = [0.2583, 0.2583, 0.2583]
HOW_TO_GET = (
    "Get the weights once, on a machine with internet access:\n"
    "    hf download microsoft/rad-dino --local-dir /data/models/rad-dino\n"
    "(older clients: `huggingface-cli download microsoft/rad-dino --local-dir ...`), copy the folder here "
    "and set features.encoder.path to it (config/radgenome.yaml). For cost benchmarks without the weights: "
    "`python -m pipeline.features demo-encoder --out DIR --params-json '{\"demo_hidden_size\": 768, "
    "\"demo_layers\": 12}' --heads 12`."
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class EncoderError(RuntimeError):
    """The encoder weights are missing, unusable, or not the architecture the config expects."""


def resolve_encoder(
    path: str | Path, revision: str | None = None, allow_download: bool = False, cache_dir: str | Path | None = None
) -> Path:
    """A local folder holding config.json + weights: the folder itself, or the cached hub snapshot."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise EncoderError(f"encoder path {str(path)!r} is a file, expected a model folder.\n{HOW_TO_GET}")
    if not _HUB_ID.match(str(path)):
        raise EncoderError(f"encoder folder {str(path)!r} not found.\n{HOW_TO_GET}")
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(
            str(path), revision=revision, local_files_only=not allow_download, cache_dir=cache_dir,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt"],
        )
    except Exception as exc:  # LocalEntryNotFoundError, offline errors, unknown revision, ...
        raise EncoderError(
            f"encoder {str(path)!r} (revision {revision or 'main'}) is neither a local folder nor in the local "
            f"Hugging Face cache, and downloads are off ({type(exc).__name__}).\n{HOW_TO_GET}"
        ) from None
    return Path(folder)


def check_architecture(folder: Path, expect: Mapping[str, Any] | None, layers: Sequence[int]) -> dict[str, Any]:
    """config.json of the folder vs the expected architecture and the requested layers."""
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise EncoderError(f"{folder}: no config.json, not a transformers model folder.\n{HOW_TO_GET}")
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "dinov2":
        raise EncoderError(f"{folder}: model_type {cfg.get('model_type')!r}, expected 'dinov2' (a Dinov2Model "
                           f"without register tokens, as RAD-DINO)")
    have = _resolved_config(cfg)
    wrong = {k: (have.get(k), v) for k, v in (expect or {}).items() if have.get(k) != v}
    if wrong:
        detail = ", ".join(f"{k} is {got} (expected {want})" for k, (got, want) in wrong.items())
        raise EncoderError(f"{folder}: encoder architecture differs from features.encoder.expect: {detail}. "
                           f"Point features.encoder.path at the right folder or update the expectation.")
    n = int(have["num_hidden_layers"])
    bad = [layer for layer in layers if not 1 <= int(layer) <= n]
    if bad:
        raise EncoderError(f"{folder}: features.layers {list(layers)}: block(s) {bad} outside 1..{n} of this encoder")
    return have


def _resolved_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """config.json with transformers' defaults filled in (saved configs omit default values)."""
    from transformers import Dinov2Config

    return Dinov2Config.from_dict(dict(raw)).to_dict()


def processor_normalisation(folder: Path, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(scale-adjusted mean, std) so that `(x - mean) / std` is the processor's output for x in [0, 1].

    The processor sees 8-bit pixels: p = 255 x, rescaled by `rescale_factor` when `do_rescale`, then
    normalised with `image_mean` / `image_std` when `do_normalize`. RAD-DINO: 255 x / 255 = x.
    """
    proc_file = folder / "preprocessor_config.json"
    if not proc_file.is_file():
        raise EncoderError(f"{folder}: no preprocessor_config.json, so the pixel normalisation the encoder was "
                           f"trained with is unknown (RAD-DINO ships one).\n{HOW_TO_GET}")
    proc = json.loads(proc_file.read_text(encoding="utf-8"))
    scale = 255.0 * (float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0)
    if proc.get("do_normalize", True):
        try:
            mean = np.asarray(proc["image_mean"], dtype=np.float64).reshape(-1)
            std = np.asarray(proc["image_std"], dtype=np.float64).reshape(-1)
        except KeyError as exc:
            raise EncoderError(f"{proc_file}: {exc.args[0]} missing") from None
    else:
        mean, std = np.zeros(channels), np.ones(channels)
    if mean.size == 1:
        mean, std = np.repeat(mean, channels), np.repeat(std, channels)
    if mean.size != channels or std.size != channels or (std <= 0).any():
        raise EncoderError(f"{proc_file}: image_mean / image_std must be {channels} values (the encoder's "
                           f"input channels) with std > 0")
    # (scale x - mean) / std == (x - mean / scale) / (std / scale)
    return (mean / scale).astype(np.float32), (std / scale).astype(np.float32)


def weights_sha256(folder: Path) -> str:
    """sha256 over the weight files (sorted by name): the cache records exactly which weights made it."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()


def load_encoder(
    path: str | Path,
    revision: str | None = None,
    *,
    expect: Mapping[str, Any] | None = None,
    layers: Sequence[int] = (),
    allow_download: bool = False,
    cache_dir: str | Path | None = None,
) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """(frozen Dinov2Model in eval mode, mean, std) for pixels in [0, 1]; see `processor_normalisation`."""
    from transformers import Dinov2Model

    folder = resolve_encoder(path, revision, allow_download, cache_dir)
    arch = check_architecture(folder, expect, layers)
    mean, std = processor_normalisation(folder, int(arch.get("num_channels", 3)))
    try:
        # a hub id goes through from_pretrained itself (same snapshot as `folder`); a folder as is
        source = str(folder) if Path(path).is_dir() else str(path)
        model, info = Dinov2Model.from_pretrained(
            source, revision=revision, local_files_only=not allow_download, output_loading_info=True,
            cache_dir=cache_dir,
        )
    except OSError as exc:
        raise EncoderError(f"{folder}: no loadable weights ({exc}).\n{HOW_TO_GET}") from None
    except (RuntimeError, ValueError) as exc:  # e.g. weights of another width than config.json says
        raise EncoderError(f"{folder}: the weights do not fit the folder's config.json: {exc}") from None
    broken = {k: v for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if broken:
        detail = "; ".join(f"{k}: {sorted(map(str, v))[:5]}{' ...' if len(v) > 5 else ''}" for k, v in broken.items())
        raise EncoderError(f"{folder}: the weights do not match the Dinov2 architecture of its config.json "
                           f"({detail}); refusing to use randomly initialised layers")
    return model.eval().requires_grad_(False), mean, std


def encoder_provenance(
    path: str | Path, revision: str | None, allow_download: bool = False, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """What the cache attributes record about the encoder (the folder's commit when it is a hub snapshot)."""
    folder = resolve_encoder(path, revision, allow_download, cache_dir)
    cfg = _resolved_config(json.loads((folder / "config.json").read_text(encoding="utf-8")))
    return {
        "encoder": str(path),
        "revision": revision,
        "snapshot": folder.name if folder.parent.name == "snapshots" else None,
        "weights_sha256": weights_sha256(folder),
        "hidden_size": int(cfg.get("hidden_size", 0)),
        "num_hidden_layers": int(cfg.get("num_hidden_layers", 0)),
        "patch_size": int(cfg.get("patch_size", 0)),
    }


def demo_encoder_config(hidden_size: int = 64, layers: int = 4, heads: int = 4, channels: int = 3) -> Any:
    """RAD-DINO's architecture (`RAD_DINO_ARCH`) with the width / depth / heads / input channels given."""
    from transformers import Dinov2Config

    return Dinov2Config(**{**RAD_DINO_ARCH, "hidden_size": hidden_size, "num_hidden_layers": layers,
                           "num_attention_heads": heads, "num_channels": channels})


def set_channel_means(model: Any) -> None:
    """Make token dims 0..C-1 the patch means of the C input channels, unchanged by
    every block: no position embedding there, and layer scale 0 on those dims, so attention and MLP
    never write to them (they still read them). With channels that are narrow HU windows (a ramp
    from 0 to 1 across the window), dim c is the fraction of the patch above channel c's window:
    mask pooling then gives each anatomical region's HU-band fractions, which is what a pretrained
    encoder would let the model see of emphysema, ground glass, consolidation or calcification, and
    a random one does not (its features average such small findings away)."""
    c = int(model.config.num_channels)
    if c > model.config.hidden_size:
        raise ValueError(f"{c} input channels need a width >= {c}, got {model.config.hidden_size}")
    emb = model.embeddings
    with torch.no_grad():
        w = emb.patch_embeddings.projection.weight  # (hidden, C, p, p)
        w[:c] = 0.0
        for k in range(c):
            w[k, k] = 1.0 / (w.shape[2] * w.shape[3])
        emb.patch_embeddings.projection.bias[:c] = 0.0
        emb.position_embeddings[..., :c] = 0.0
        emb.cls_token[..., :c] = 0.0
        for block in model.encoder.layer:
            block.layer_scale1.lambda1[:c] = 0.0
            block.layer_scale2.lambda1[:c] = 0.0


def build_demo_encoder(out_dir: Path, hidden_size: int = 64, layers: int = 4, heads: int = 4, seed: int = 0,
                       channels: int = 3, channel_means: bool = False) -> None:
    """A randomly initialised Dinov2 + RAD-DINO's processor config, saved like a hub folder.

    `hidden_size=768, layers=12, heads=12` is RAD-DINO's exact architecture (86.6 M parameters), for
    realistic-cost benchmarks without the weights. Loaded by `load_encoder` like the real model.
    `channel_means`: dims 0..channels-1 measure the patch means of the input channels
    (`set_channel_means`), with a processor that passes pixels through unchanged (mean 0, std 1).
    """
    from transformers import BitImageProcessor, Dinov2Model

    from pipeline.io import atomic_output

    torch.manual_seed(seed)
    mean, std = (RAD_DINO_MEAN, RAD_DINO_STD) if channels == 3 and not channel_means else ([0.0] * channels,
                                                                                           [1.0] * channels)
    processor = BitImageProcessor(
        do_resize=True, size={"shortest_edge": 518}, resample=3, do_center_crop=True,
        crop_size={"height": 518, "width": 518}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=mean, image_std=std, do_convert_rgb=True,
    )
    model = Dinov2Model(demo_encoder_config(hidden_size, layers, heads, channels))
    if channel_means:
        set_channel_means(model)
    with atomic_output(Path(out_dir)) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
