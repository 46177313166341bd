"""Feature-cache size per volume at the defaults vs the raw final-layer tokens, side by side.

    python benchmarks/features_size.py [--volumes 2] [--threads 2]

Encodes `--volumes` synthetic RadGenome-sized volumes (110 x 360 x 360, benchmarks/features_synth.py)
with a randomly initialised encoder of RAD-DINO's exact architecture (768 wide, 12 blocks, patch 14)
at the defaults (32 x 256 x 256, blocks 3, 6, 9, 12, R2, 9 masks, mask grid 8 x 16 x 16), on CPU,
keeping the raw tokens; then writes the same features as a pooled shard with each codec and the raw
tokens as a raw-token shard, and prints bytes on disk per volume (chunk files + metadata / volumes).
Goal: <= 1.2 MB per volume, vs ~16 MB (32 x 324 x 768 fp16) of raw final-layer tokens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features_synth import synthetic_volume  # noqa: E402

from pipeline.feature_store import FeatureShardWriter, RawTokenWriter  # noqa: E402
from pipeline.features import FeatureConfig, build_demo_encoder, encode_prepared, load_encoder, prepare_volume  # noqa: E402


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="features-size-"))
    try:
        build_demo_encoder(root / "encoder", 768, 12, 12)
        cfg = FeatureConfig()
        encoder, mean, std = load_encoder(root / "encoder", layers=cfg.layers)
        results = []
        t0 = time.perf_counter()
        for i in range(args.volumes):
            ct, labels = synthetic_volume(i)
            prep = prepare_volume(ct.astype(np.float32), labels, cfg, 14, f"v{i}")
            results.append(encode_prepared(encoder, mean, std, prep, cfg, keep_raw=True))
        print(f"encoded {args.volumes} volumes with the RAD-DINO-sized random encoder in "
              f"{time.perf_counter() - t0:.0f} s (CPU, {args.threads} threads)")
        shapes = {k: v.shape for k, v in results[0][0].items()}
        print("per volume: " + ", ".join(f"{k} {tuple(s)}" for k, s in shapes.items()))
        n_values = sum(int(np.prod(s)) for s in shapes.values())
        rows = []
        for comp in ("lz4", "zstd", "none"):
            path = root / f"pooled-{comp}.zarr"
            with FeatureShardWriter(path, {}, args.volumes, comp) as w:
                for i, (feats, _) in enumerate(results):
                    w.add(f"v{i}", feats)
            rows.append((f"feature cache, {comp}" + (" (default)" if comp == "lz4" else ""), disk_bytes(path)))
        raw_path = root / "raw.zarr"
        with RawTokenWriter(raw_path, {}, args.volumes, "lz4") as w:
            for i, (_, raw) in enumerate(results):
                w.add(f"v{i}", raw)
        rows.append(("raw-token cache, lz4 (raw_cache: true)", disk_bytes(raw_path)))
        raw_tokens = results[0][1]["tokens"].nbytes
        print(f"\n{'':45s} {'MB / volume':>12s} {'vs raw tokens':>14s}")
        print(f"{'raw final-layer tokens 32 x 324 x 768 fp16':45s} {raw_tokens / 1e6:12.2f} {1.0:13.2f}x")
        for name, size in rows:
            per = size / args.volumes
            print(f"{name:45s} {per / 1e6:12.3f} {per / raw_tokens:13.3f}x")
        print(f"\npacked values per volume: {n_values:,} fp16 = {n_values * 2 / 1e6:.3f} MB before compression "
              f"(goal <= 1.2 MB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
