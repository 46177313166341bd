"""Feature-cache reader speed on one core: training samples (all six arrays of one volume) per second.

    python benchmarks/features_reader.py [--volumes 200] [--rounds 5] [--cpu 0]

Writes one shard of `--volumes` volumes at the default shapes (C = 768: global 32 x C, region 324 x C,
mask_pooled 9 x 4 x C, mask_grid 9 x 8 x 16 x 16, region_slices 6, mask_present 9; token values
random normal, i.e. incompressible like real fp16 features) in each layout, warms the page cache, pins
the process to one core (one torch / blosc thread), then reads random volumes in interleaved rounds:

- packed-lz4 / packed-none / packed-zstd: the cache layout (`pipeline.feature_store`), `FeatureStore[id]`;
- six-arrays: the first layout (six zarr arrays per volume, zarr's default compression, read through
  zarr's API), the baseline: ~130 samples/s measured with this script (docs/features-and-cache.md);
- "+ numpy fp32": the same read plus what `model.data.ReportDataset.__getitem__` does with it today
  (concatenate global + region, numpy `astype(float32)`, tensors); "+ torch fp32": the same tensors
  converted by torch instead (numpy's fp16 -> fp32 cast is not vectorised: ~0.6 ms per sample).

Prints median samples/s per layout (goal >= 1,000) and the ratio to the six-array baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore, write_feature_shard  # noqa: E402

C = 768


def arrays(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    grid = np.zeros((n, 9, 8, 16, 16), np.float16)
    grid[:, :6, 2:6, 4:12, 4:12] = rng.random((n, 6, 4, 8, 8))
    return {
        "global": rng.standard_normal((n, 32, C), dtype=np.float32).astype(np.float16),
        "region": rng.standard_normal((n, 324, C), dtype=np.float32).astype(np.float16),
        "mask_pooled": rng.standard_normal((n, 9, 4, C), dtype=np.float32).astype(np.float16),
        "mask_grid": grid,
        "region_slices": rng.integers(0, 32, (n, 6)).astype(np.int16),
        "mask_present": rng.random((n, 9)) > 0.2,
    }


def six_array_shard(path: Path, ids: list[str], data: dict[str, np.ndarray]) -> None:
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    for name in FEATURE_ARRAYS:
        d = data[name]
        group.create_array(name, shape=d.shape, chunks=(1, *d.shape[1:]), dtype=d.dtype)[...] = d
    group.attrs.update({"volume_ids": ids, "complete": True})


def to_tensors_numpy(f: dict[str, np.ndarray]) -> None:
    """What model/data.py's ReportDataset.__getitem__ does today: numpy fp16 -> fp32 (no SIMD: slow)."""
    import torch

    torch.from_numpy(np.concatenate([f["global"], f["region"]], axis=0).astype(np.float32))
    torch.from_numpy(f["mask_pooled"].astype(np.float32))
    torch.from_numpy(f["mask_grid"].astype(np.float32))


def to_tensors_torch(f: dict[str, np.ndarray]) -> None:
    """The same tensors converted by torch (vectorised fp16 -> fp32)."""
    import torch

    torch.from_numpy(np.concatenate([f["global"], f["region"]], axis=0)).float()
    torch.from_numpy(f["mask_pooled"]).float()
    torch.from_numpy(f["mask_grid"]).float()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reads", type=int, default=600, help="reads per round (six-arrays: a sixth of it)")
    ap.add_argument("--cpu", type=int, default=0, help="core to pin to")
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()

    os.sched_setaffinity(0, {args.cpu})
    import numcodecs.blosc
    import torch

    torch.set_num_threads(1)
    numcodecs.blosc.set_nthreads(1)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="features-reader-"))
    ids = [f"v{i:05d}" for i in range(args.volumes)]
    data = arrays(args.volumes)
    stores = {}
    for comp in ("lz4", "none", "zstd"):
        write_feature_shard(root / f"packed-{comp}" / "shard-0.zarr", ids, data, {"hidden_size": C}, compressor=comp)
        stores[f"packed-{comp}"] = FeatureStore([root / f"packed-{comp}" / "shard-0.zarr"])
    six_array_shard(root / "six" / "shard-0.zarr", ids, data)
    stores["six-arrays"] = FeatureStore([root / "six" / "shard-0.zarr"])
    sizes = {name: sum(f.stat().st_size for f in (root / (name if name != "six-arrays" else "six")).rglob("*")
                       if f.is_file()) / args.volumes for name in stores}
    for store in stores.values():  # warm the page cache and the lazy metadata
        for vid in ids:
            store[vid]
    ref = stores["six-arrays"][ids[7]]
    for name, store in stores.items():
        got = store[ids[7]]
        assert all(np.array_equal(got[k], ref[k]) for k in FEATURE_ARRAYS), name

    rng = np.random.default_rng(1)
    convert = {"+ numpy fp32": to_tensors_numpy, "+ torch fp32": to_tensors_torch}
    rates: dict[str, list[float]] = {n: [] for n in [*stores, *(f"packed-lz4 {c}" for c in convert)]}
    names = list(rates)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate so that no layout is always first
        for name in order:
            k = args.reads // 6 if name == "six-arrays" else args.reads
            pick = [ids[i] for i in rng.integers(0, len(ids), k)]
            store = stores[name.split(" ")[0]]
            conv = convert.get(name.partition(" ")[2])
            t = time.perf_counter()
            if conv is not None:
                for vid in pick:
                    conv(store[vid])
            else:
                for vid in pick:
                    store[vid]
            rates[name].append(k / (time.perf_counter() - t))
    base = statistics.median(rates["six-arrays"])
    print(f"reader, one core (cpu {args.cpu}), {args.volumes} volumes, {args.rounds} interleaved rounds, "
          f"page cache warm")
    print(f"{'layout':24s} {'MB/volume':>10s} {'samples/s (median)':>20s} {'min..max':>18s} {'vs six-arrays':>14s}")
    for name, vals in rates.items():
        size = sizes.get(name.split(" ")[0], float("nan"))
        med = statistics.median(vals)
        print(f"{name:24s} {size / 1e6:10.3f} {med:20.0f} {min(vals):8.0f}..{max(vals):<8.0f} {med / base:13.1f}x")
    if not args.workdir:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
