"""Features stage overhead on CPU: the whole stage for a shard vs the encoder forwards alone.

    python benchmarks/features_stage.py [--volumes 3] [--repeats 2] [--threads 2]

A shard of `--volumes` synthetic RadGenome-sized volumes (110 x 360 x 360 .nii.gz + a masks Zarr,
benchmarks/features_synth.py) and a randomly initialised encoder of RAD-DINO's exact architecture
(768 wide, 12 blocks, patch 14) saved to a folder. Measured in alternating order (stage first, then
forwards first, ...), same torch threads:

- stage: `pipeline.features.run_shard` at the defaults (32 x 256 x 256, blocks 3, 6, 9, 12, R2):
  load the encoder, read CT + masks, preprocess (prefetch thread), encode with the mask-pooling
  hooks, pool, write the Zarr shard;
- forwards: the plain `encoder(pixel_values=...)` calls on the same slices, already preprocessed
  and normalised, in batches of the same size, `inference_mode` (the floor the stage cannot beat).

Prints each pair (wall and CPU seconds, the reader processes' included), the median wall ratio
stage / forwards, the ratio of the best walls and the median CPU-time ratio (goal <= 1.25). On a
shared machine the wall times swing with other people's load; the CPU-time ratio does much less.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features_synth import write_shard_inputs  # noqa: E402

from pipeline.features import FeatureConfig, build_demo_encoder, load_encoder, prepare_volume, run_shard  # noqa: E402
from pipeline.io import image_array, read_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--volumes", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="features-stage-"))
    try:
        enc_dir = root / "encoder"
        build_demo_encoder(enc_dir, 768, 12, 12)
        manifest, masks = write_shard_inputs(root / "inputs", args.volumes)
        cfg = FeatureConfig()  # the defaults
        encoder, mean, std = load_encoder(enc_dir, layers=cfg.layers)
        import zarr

        group = zarr.open_group(str(masks), mode="r")
        batches = []  # the same slices, preprocessed and normalised, untimed
        for row in manifest.itertuples(index=False):
            ct = image_array(read_image(row.ct_path, row.volume_id), row.ct_path, row.volume_id, np.float32)
            prep = prepare_volume(ct, np.asarray(group[row.volume_id][...]), cfg, 14, row.volume_id)
            x = (prep.pixels[:, None].expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(
                std).view(1, 3, 1, 1)
            batches += [x[i : i + cfg.batch_size].contiguous() for i in range(0, x.shape[0], cfg.batch_size)]

        @torch.inference_mode()
        def forwards() -> None:
            for x in batches:
                encoder(pixel_values=x)

        def stage() -> None:
            out = root / "out" / "shard-0.zarr"
            run_shard(manifest, 0, masks, str(enc_dir), None, cfg, out, threads=args.threads)

        def cpu_seconds() -> float:  # this process and its reaped children (the reader processes)
            a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
            return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

        pairs = []
        for r in range(args.repeats):
            order = [("stage", stage), ("forwards", forwards)]
            if r % 2:
                order.reverse()
            times: dict[str, float] = {}
            for name, fn in order:
                t, c = time.perf_counter(), cpu_seconds()
                fn()
                times[name], times[name + "_cpu"] = time.perf_counter() - t, cpu_seconds() - c
                print(f"repeat {r + 1}: {name:8s} {times[name]:7.1f} s wall, {times[name + '_cpu']:7.1f} s CPU",
                      flush=True)
            pairs.append(times)
        n_slices = args.volumes * cfg.input_size[0]
        print(f"\nshard of {args.volumes} volumes ({n_slices} slices of 256 x 256), RAD-DINO-sized random encoder, "
              f"CPU, {args.threads} torch threads, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'repeat':>6s} {'stage s':>9s} {'forwards s':>11s} {'wall ratio':>11s} {'CPU ratio':>10s}")
        for i, p in enumerate(pairs, 1):
            print(f"{i:6d} {p['stage']:9.1f} {p['forwards']:11.1f} {p['stage'] / p['forwards']:11.3f} "
                  f"{p['stage_cpu'] / p['forwards_cpu']:10.3f}")
        wall = statistics.median(p["stage"] / p["forwards"] for p in pairs)
        best = min(p["stage"] for p in pairs) / min(p["forwards"] for p in pairs)
        cpu = statistics.median(p["stage_cpu"] / p["forwards_cpu"] for p in pairs)
        print(f"stage / forwards: median wall ratio {wall:.3f}, ratio of best walls {best:.3f}, median CPU-time "
              f"ratio {cpu:.3f} (goal <= 1.25); forwards alone "
              f"{n_slices / min(p['forwards'] for p in pairs):.2f} slices/s (best)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
