"""The features stage for one shard, the re-pooling stage, and the CLI the rules call.

    python -m pipeline.features encode --manifest results/cohort.parquet --shard 0 \\
        --masks results/masks/shard-0.zarr --encoder /models/rad-dino --params-json '{...}' \\
        --out results/features/rad-dino-r2/shard-0.zarr [--raw-out results/features/rad-dino-raw/shard-0.zarr]
    python -m pipeline.features pool --raw results/features/rad-dino-raw/shard-0.zarr \\
        --params-json '{"pooling": "lita", ...}' --out results/features/rad-dino-lita/shard-0.zarr
    python -m pipeline.features demo-encoder --out DIR [--params-json '{"demo_hidden_size": 768, "demo_layers": 12}' --heads 12]

Volumes are streamed: reader processes (`workers`, a DataLoader) read the CT and masks of the next
`prefetch` volumes and preprocess them while the encoder runs on the current one (and while its
weights load). Each volume's arrays go straight into the shard being written (temporary path, renamed
when complete), so memory does not grow with the shard size.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pandas as pd
import torch

from pipeline.constants import CHANNELS, REGIONS, TOKEN_MASKS
from pipeline.feature_store import FeatureShardWriter, RawTokenStore, RawTokenWriter
from pipeline.features.config import FeatureConfig, FeatureConfigError
from pipeline.features.encode import encode_prepared
from pipeline.features.encoder import (
    build_demo_encoder,
    check_architecture,
    encoder_provenance,
    load_encoder,
    resolve_encoder,
)
from pipeline.features.pooling import pool_tokens
from pipeline.features.preprocess import PreparedVolume, prepare_volume
from pipeline.io import InputError, image_array, read_image, setup_logging, write_parquet
from pipeline.orientation import CANONICAL, reorientation
from pipeline.stage_config import settings_from_cli

CODE_VERSION = "features-2"
# How a CT reaches the encoder, recorded in every cache's attributes (docs/data-and-segmentation.md)
ORIENTATION = f"{CANONICAL} (ITK identity direction: +x patient left, +y posterior, +z superior); exact axis " \
              "permutation and flips, a residual oblique rotation is not resampled away"
RESAMPLING = ("CT: trilinear (align_corners false) from the canonical grid to input_size (D, H, W) whatever the "
              "spacing: through-plane and in-plane scale factors differ per volume, the voxel aspect is not kept; "
              "HU window after resizing. Masks: area fractions per output voxel (box averaging where an axis "
              "shrinks, linear where it grows), kept at >= mask_threshold")
T = TypeVar("T")
R = TypeVar("R")


def prefetched(
    items: Iterable[T], fn: Callable[[T], R], depth: int, workers: int = 1
) -> Iterator[tuple[T, Future[R]]]:
    """(item, future of fn(item)) in order, with up to `depth` items computed ahead by `workers` threads.

    Reading (zlib, ITK) and preprocessing (numpy, torch) spend their time outside the GIL, so the
    threads overlap the encoder and each other; memory is bounded by `depth` prepared volumes.
    """
    if depth <= 0:
        for item in items:
            fut: Future[R] = Future()
            try:
                fut.set_result(fn(item))
            except Exception as exc:
                fut.set_exception(exc)
            yield item, fut
        return
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="features-prefetch")
    try:
        source = iter(items)
        queue: deque[tuple[T, Future[R]]] = deque()
        for item in source:
            queue.append((item, pool.submit(fn, item)))
            if len(queue) > depth:
                break
        while queue:
            item, fut = queue.popleft()
            for nxt in source:  # at most one
                queue.append((nxt, pool.submit(fn, nxt)))
                break
            yield item, fut
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class ShardVolumes(torch.utils.data.Dataset):
    """(volume_id, PreparedVolume) per volume of a shard; a bad volume gives (volume_id, InputError).

    Errors are returned, not raised, so that a reader process survives a bad file and the encoder
    loop decides (fail or skip). The masks group is opened lazily, once per reader process.
    """

    def __init__(self, items: Sequence[tuple[str, str]], masks_zarr: str, cfg: FeatureConfig, patch: int):
        self.items = list(items)
        self.masks_zarr = masks_zarr
        self.cfg = cfg
        self.patch = patch
        self._masks: Any = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, PreparedVolume | Exception]:
        import zarr

        volume_id, ct_path = self.items[i]
        try:
            if self._masks is None:
                self._masks = zarr.open_group(self.masks_zarr, mode="r")
            image = read_image(ct_path, volume_id)
            # the CT on the masks' canonical grid (LPS, as the regions stage stores them): exact
            # transpose / flip, nothing moves for a CT already in LPS
            ct = canonical_ct(image_array(image, ct_path, volume_id, np.float32), image.GetDirection(), ct_path,
                              volume_id, self._masks.attrs.get("orientation"))
            labels = np.asarray(self._masks[volume_id][...])
            if labels.shape != ct.shape:
                raise InputError(f"volume {volume_id}: CT {ct_path} has shape {ct.shape}, masks {labels.shape}")
            return volume_id, prepare_volume(ct, labels, self.cfg, self.patch, volume_id)
        except (InputError, ValueError) as exc:
            return volume_id, exc


def canonical_ct(ct: np.ndarray, direction: Sequence[float], ct_path: str, volume_id: str,
                 masks_orientation: object) -> np.ndarray:
    """The (z, y, x) CT in the canonical orientation (`pipeline.orientation`), C-contiguous.

    A masks store without the `orientation` attribute was written before masks were reoriented (on
    the CT's own grid): a CT that would move is refused rather than paired with masks on another grid."""
    try:
        turn = reorientation(direction)
    except ValueError as exc:
        raise InputError(f"volume {volume_id}: {ct_path}: {exc}") from None
    if turn.identity:
        return ct
    if masks_orientation != CANONICAL:
        raise InputError(f"volume {volume_id}: {ct_path} is not stored in {CANONICAL} and the masks store has no "
                         f"{CANONICAL} orientation attribute (written by older code): rerun the regions stage")
    return np.ascontiguousarray(turn.array(ct))


def _as_is(item: Any) -> Any:
    return item


def stream_volumes(
    dataset: ShardVolumes, workers: int, prefetch: int
) -> Iterator[tuple[str, PreparedVolume | Exception]]:
    """The shard's volumes in order, read and preprocessed ahead of the encoder.

    `workers` >= 1: that many reader processes (a DataLoader; each uses one torch thread, so they
    neither hold the GIL nor share the encoder's thread pool), `prefetch` volumes ahead in all; they
    start reading when this returns. `workers` 0: one reader thread in this process.
    """
    if workers <= 0:
        return (fut.result() for _, fut in prefetched(range(len(dataset)), dataset.__getitem__, max(1, prefetch)))
    if not len(dataset):
        return iter(())
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                        prefetch_factor=max(1, -(-max(1, prefetch) // workers)))
    return iter(loader)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_shard(
    manifest: pd.DataFrame,
    shard: int,
    masks_zarr: Path,
    encoder_path: str,
    revision: str | None,
    cfg: FeatureConfig,
    out: Path | None,
    on_error: str = "fail",
    threads: int = 1,
    raw_out: Path | None = None,
    expect: dict[str, Any] | None = None,
    allow_download: bool = False,
    qc_out: Path | None = None,
) -> list[str]:
    """Encode the shard's volumes; write the pooled shard (`out`) and / or the raw-token cache, and the
    QC table `qc_out` (volume_id, stage, status ok / error / skipped, error; `pipeline.skipped` reads it)."""
    if out is None and raw_out is None:
        raise ValueError("nothing to write: give out and / or raw_out")
    log = setup_logging()
    torch.set_num_threads(max(1, threads))
    device = resolve_device(cfg.device)
    # the architecture check reads config.json only: a wrong folder fails before any work
    arch = check_architecture(resolve_encoder(encoder_path, revision, allow_download), expect, cfg.layers)
    patch = int(arch["patch_size"])
    gh, gw = cfg.patch_grid(patch)
    grid = cfg.pooled_grid(patch)  # validates s * h * w = T before any work
    from pipeline.regions import open_masks

    masks = open_masks(masks_zarr)
    if list(masks.attrs.get("channels", CHANNELS)) != list(CHANNELS):
        raise InputError(f"{masks_zarr}: its channel table differs from this code's "
                         f"(pipeline.constants.CHANNELS): rerun the regions stage")
    have_masks = set(masks.attrs["volume_ids"])
    rows = manifest[manifest["shard"] == shard]
    todo: list[tuple[str, str]] = []
    qc: list[dict[str, str]] = []
    for row in rows.itertuples(index=False):
        if row.volume_id in have_masks:
            todo.append((str(row.volume_id), str(row.ct_path)))
        else:
            log.warning("volume %s has no masks (failed in the regions stage): skipped", row.volume_id)
            qc.append({"volume_id": str(row.volume_id), "stage": "features", "status": "skipped",
                       "error": f"no masks in {masks_zarr} (failed in an earlier stage)"})

    # the readers start now, so that the first volumes are ready when the weights are loaded
    volumes = stream_volumes(ShardVolumes(todo, str(masks_zarr), cfg, patch), cfg.workers, cfg.prefetch)
    encoder, mean, std = load_encoder(encoder_path, revision, expect=expect, layers=cfg.layers,
                                      allow_download=allow_download)
    n_in = int(encoder.config.num_channels)
    if cfg.channel_windows is not None and len(cfg.channel_windows) != n_in:
        raise FeatureConfigError(f"features.channel_windows gives {len(cfg.channel_windows)} windows, but the encoder "
                                 f"{encoder_path} takes {n_in} input channels: give one window per channel")
    encoder = encoder.to(device)
    prov = encoder_provenance(encoder_path, revision, allow_download)
    common = {
        **prov,
        "input_size": list(cfg.input_size),
        "orientation": ORIENTATION,
        "resampling": RESAMPLING,
        "hu_window": list(cfg.hu_window),
        "channel_windows": cfg.to_params()["channel_windows"],
        "mask_threshold": cfg.mask_threshold,
        "layers": list(cfg.layers),
        "patch_grid": [gh, gw],
        "mask_grid": list(cfg.mask_grid),
        "masks": list(TOKEN_MASKS),
        "regions": list(REGIONS),
        "code_version": CODE_VERSION,
        "device": str(device),
        "precision": "bf16-autocast" if device.type == "cuda" else "fp32",
    }
    pooled_attrs = {**common, "pooling": cfg.pooling, "slices": cfg.n_slices, "region_grid": list(grid),
                    "region_tokens": cfg.n_slices * grid[0] * grid[1]}
    ids: list[str] = []
    t0 = time.perf_counter()
    t_wait = 0.0
    with contextlib.ExitStack() as stack:
        writer = (stack.enter_context(FeatureShardWriter(out, pooled_attrs, len(todo), cfg.compressor))
                  if out is not None else None)
        raw_writer = (stack.enter_context(RawTokenWriter(raw_out, common, len(todo), cfg.compressor))
                      if raw_out is not None else None)
        tw = time.perf_counter()
        for i, (volume_id, prep) in enumerate(volumes, 1):
            t_wait += time.perf_counter() - tw
            if isinstance(prep, Exception):
                if on_error != "skip":
                    raise prep
                log.error("%s (skipped)", prep)
                qc.append({"volume_id": volume_id, "stage": "features", "status": "error", "error": str(prep)})
                tw = time.perf_counter()
                continue
            if device.type == "cuda":
                prep.pin()
            features, raw = encode_prepared(encoder, mean, std, prep, cfg, keep_raw=raw_writer is not None)
            if writer is not None:
                writer.add(volume_id, features)
            if raw_writer is not None:
                raw_writer.add(volume_id, raw)
            ids.append(volume_id)
            qc.append({"volume_id": volume_id, "stage": "features", "status": "ok", "error": ""})
            dt = time.perf_counter() - t0
            log.info("[%d/%d] %s encoded (%.2f volumes/s, %.1f slices/s, %.1f s waiting for input)", i, len(todo),
                     volume_id, len(ids) / dt, len(ids) * cfg.input_size[0] / dt, t_wait)
            tw = time.perf_counter()
    log.info("shard %d: %d volumes in %.1f s", shard, len(ids), time.perf_counter() - t0)
    if qc_out is not None:
        write_parquet(pd.DataFrame(qc, columns=["volume_id", "stage", "status", "error"]), qc_out)
    return ids


def pool_shard(raw_path: Path, cfg: FeatureConfig, out: Path) -> list[str]:
    """Re-pool a raw-token shard with `cfg`'s pooling / s / grid, without re-encoding."""
    log = setup_logging()
    raw = RawTokenStore(raw_path)
    a = raw.attrs
    fixed = {"input_size": list(cfg.input_size), "hu_window": list(cfg.hu_window),
             "channel_windows": cfg.to_params()["channel_windows"], "layers": list(cfg.layers),
             "mask_threshold": cfg.mask_threshold, "mask_grid": list(cfg.mask_grid)}
    changed = {k: (a.get(k), v) for k, v in fixed.items() if a.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: cache {old} vs config {new}" for k, (old, new) in changed.items())
        raise ValueError(f"{raw_path}: the raw-token cache was made with other encoding settings ({detail}); "
                         f"these need re-encoding (rerun the features rule)")
    patch = int(a["patch_size"])
    grid = cfg.pooled_grid(patch)
    attrs = {k: v for k, v in a.items() if k not in ("store_format", "compressor")}
    attrs.update({"pooling": cfg.pooling, "slices": cfg.n_slices, "region_grid": list(grid),
                  "region_tokens": cfg.n_slices * grid[0] * grid[1], "pooled_from": str(raw_path)})
    t0 = time.perf_counter()
    with FeatureShardWriter(out, attrs, len(raw), cfg.compressor) as writer:
        for vid in raw.volume_ids:
            r = raw[vid]
            pooled = pool_tokens(torch.from_numpy(r["tokens"]), a["patch_grid"], r["region_area"],
                                 cfg.pooling, cfg.n_slices, grid)
            writer.add(vid, {**pooled, "mask_pooled": r["mask_pooled"], "mask_grid": r["mask_grid"],
                             "mask_present": r["mask_present"]})
    log.info("%s: %d volumes re-pooled (%s, s=%d, grid %s) in %.1f s", out, len(raw), cfg.pooling, cfg.n_slices,
             grid, time.perf_counter() - t0)
    return list(raw.volume_ids)


@dataclass(frozen=True)
class DemoEncoderSettings:
    """The demo encoder's settings: `features.encoder`'s demo_* keys and `features.channel_windows`."""

    demo_hidden_size: int = 64
    demo_layers: int = 4
    demo_channel_means: bool = False
    channel_windows: list[list[float]] | None = None

    @property
    def channels(self) -> int:
        """Input channels: one per HU window (three grey copies without channel windows)."""
        return 3 if self.channel_windows is None else len(self.channel_windows)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.features", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, help="encode | pool | demo-encoder")
    enc = sub.add_parser("encode", help="encode one shard")
    enc.add_argument("--manifest", type=Path, required=True, help="the cohort manifest (.parquet)")
    enc.add_argument("--shard", type=int, required=True, help="the shard to encode")
    enc.add_argument("--masks", type=Path, required=True, help="the shard's compact mask store (.zarr)")
    enc.add_argument("--encoder", required=True, help="local folder, or hub id in the local cache")
    enc.add_argument("--revision", help="commit of a hub id in the local cache")
    enc.add_argument("--expect-json", default="{}", help="expected encoder architecture (config.json fields)")
    enc.add_argument("--allow-download", action="store_true", help="let from_pretrained download (off: offline)")
    enc.add_argument("--params-json", required=True, help="FeatureConfig fields as JSON")
    enc.add_argument("--out", type=Path, help="pooled feature shard (.zarr)")
    enc.add_argument("--raw-out", type=Path, help="raw-token cache shard (.zarr)")
    enc.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                     help="a bad volume stops the job (fail) or is recorded in the QC table (skip)")
    enc.add_argument("--qc", type=Path, help="per-volume QC table (.parquet)")
    enc.add_argument("--threads", type=int, default=1, help="torch threads of the job")
    pool = sub.add_parser("pool", help="re-pool a raw-token shard")
    pool.add_argument("--raw", type=Path, required=True, help="the raw-token cache shard (.zarr)")
    pool.add_argument("--params-json", required=True, help="FeatureConfig fields as JSON")
    pool.add_argument("--out", type=Path, required=True, help="pooled feature shard (.zarr)")
    pool.add_argument("--threads", type=int, default=1, help="torch threads of the job")
    demo = sub.add_parser("demo-encoder", help="write a random-initialised Dinov2 folder (RAD-DINO architecture)")
    demo.add_argument("--out", type=Path, required=True, help="the encoder folder to write")
    demo.add_argument("--params-json", default="{}",
                      help="DemoEncoderSettings as JSON: features.encoder's demo_hidden_size, demo_layers, "
                           "demo_channel_means and features.channel_windows (one input channel per window)")
    demo.add_argument("--heads", type=int, default=4, help="attention heads")
    demo.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    args = ap.parse_args(argv)
    if args.command == "demo-encoder":
        demo_cfg = settings_from_cli(ap, DemoEncoderSettings, args.params_json, section="features.encoder")
        build_demo_encoder(args.out, demo_cfg.demo_hidden_size, demo_cfg.demo_layers, args.heads, args.seed,
                           demo_cfg.channels, demo_cfg.demo_channel_means)
        return
    cfg = FeatureConfig.from_params(json.loads(args.params_json))
    if args.command == "pool":
        torch.set_num_threads(max(1, args.threads))
        pool_shard(args.raw, cfg, args.out)
        return
    run_shard(pd.read_parquet(args.manifest), args.shard, args.masks, args.encoder, args.revision, cfg, args.out,
              args.on_error, args.threads, raw_out=args.raw_out, expect=json.loads(args.expect_json) or None,
              allow_download=args.allow_download, qc_out=args.qc)
