"""GPU check of the features stage with RAD-DINO's exact architecture (random weights), bf16.

    python benchmarks/gpu_features.py --device cuda --out DIR         # < 90 s on an H100
    python benchmarks/gpu_features.py --tiny --device cpu --out DIR   # a seconds-long check that it runs

1. Encoder forwards alone: batch sweep (32, 64, 128, 256 slices of 256 x 256), `inference_mode`,
   bf16 autocast on fp32 weights (what the stage does) and bf16 weights; warmup, then timed repeats
   between `torch.cuda.synchronize()` calls; median -> slices/s; peak memory; the fraction of the card
   (ViT forward FLOPs per slice x slices/s over an 8192^3 bf16 matrix product timed in the same run).
2. `encode_prepared` (the stage's encoder step: hooks mask-pool blocks 3, 6, 9, 12, R2 pooling) on a
   preprocessed synthetic volume (D = 32) -> slices/s, vs the plain forward at the same batch.
3. CPU side: `prepare_volume` on a RadGenome-sized synthetic volume (110 x 360 x 360) -> s / volume,
   and `run_shard` (read .nii.gz + masks, preprocess, encode, write Zarr) on a few such volumes with
   1 and 4 reader processes -> volumes/s: on a GPU node the readers, not the GPU, set the pace.

Anchor: ~1,800 slices/s on an RTX 4090 at 256 px, derived from timm's published inference benchmark of
the same ViT-B/14 at 518 px (an estimate, not a measurement). Writes DIR/gpu_features.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from features_synth import synthetic_volume, write_shard_inputs  # noqa: E402

from pipeline.features import (  # noqa: E402
    RAD_DINO_MEAN,
    RAD_DINO_STD,
    FeatureConfig,
    build_demo_encoder,
    demo_encoder_config,
    encode_prepared,
    prepare_volume,
    run_shard,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul(n: int, device: torch.device):
    """A function doing one n^3 bf16 matrix product (operands made once)."""
    a = torch.randn((n, n), device=device, dtype=torch.bfloat16)
    return lambda: a @ a


def timed(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model and inputs: checks the script, measures nothing")
    ap.add_argument("--batch-sizes", default="32,64,128,256")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--stage-volumes", type=int, default=6)
    ap.add_argument("--budget-s", type=float, default=80.0, help="skip what is left after this many seconds")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.tiny:
        hidden, layers, heads, size, batches = 32, 4, 2, 56, [2, 4]
        cfg = FeatureConfig(input_size=(4, 84, 84), layers=(1, 2, 3, 4), batch_size=4)
        vol_shape, n_stage, warmup, repeats = (6, 40, 40), 2, 1, 2
    else:
        hidden, layers, heads, size = 768, 12, 12, 256
        batches = [int(b) for b in args.batch_sizes.split(",")]
        cfg = FeatureConfig(batch_size=32)  # the defaults: 32 x 256 x 256, blocks 3, 6, 9, 12, R2
        vol_shape, n_stage, warmup, repeats = (110, 360, 360), args.stage_volumes, args.warmup, args.repeats
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "architecture": {"hidden_size": hidden, "layers": layers, "heads": heads, "patch": 14, "input_px": size},
        "anchor": "~1,800 slices/s on an RTX 4090 at 256 px (estimate derived from timm's 518 px inference benchmark)",
        "sweep": [],
        "skipped": [],
    }
    print(f"device: {result['device']}  torch {torch.__version__}", flush=True)

    from transformers import Dinov2Model

    model = Dinov2Model(demo_encoder_config(hidden, layers, heads)).eval().requires_grad_(False).to(device)
    # the fraction of the card: ViT forward FLOPs per slice (MLP ratio 4, tokens = patches + CLS) against an
    # n^3 bf16 matrix product timed now, on the same card
    tokens = (size // 14) ** 2 + 1
    flops_slice = layers * (2 * tokens * 12 * hidden * hidden + 4 * tokens * tokens * hidden)
    n_mm = 512 if args.tiny else 8192
    matmul_rate = 2.0 * n_mm**3 / statistics.median(timed(matmul(n_mm, device), device, 2, 5))
    result["flops_per_slice"] = flops_slice
    result["matmul_bf16_tflops_per_s"] = round(matmul_rate / 1e12, 3)
    result["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    modes = ["autocast-bf16", "bf16-weights"] if device.type == "cuda" else ["fp32"]

    def left() -> float:
        return args.budget_s - (time.perf_counter() - t_start)

    # 1. forwards alone
    for mode in modes:
        net = model if mode != "bf16-weights" else Dinov2Model(demo_encoder_config(hidden, layers, heads)).eval().to(
            device, torch.bfloat16)
        for b in batches:
            if left() < 20:
                result["skipped"].append(f"sweep {mode} batch {b}")
                continue
            x = torch.randn(b, 3, size, size, device=device)
            if mode == "bf16-weights":
                x = x.to(torch.bfloat16)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if mode == "autocast-bf16" else torch.autocast(
                device.type, enabled=False)

            @torch.inference_mode()
            def fwd(net=net, x=x, ctx=ctx):
                with ctx:
                    return net(pixel_values=x).last_hidden_state

            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            try:
                times = timed(fwd, device, warmup, repeats)
            except torch.OutOfMemoryError:
                result["sweep"].append({"mode": mode, "batch": b, "error": "out of memory"})
                torch.cuda.empty_cache()
                continue
            med = statistics.median(times)
            row = {"mode": mode, "batch": b, "ms_per_batch": round(med * 1e3, 2), "slices_per_s": round(b / med, 1),
                   "fraction_of_matmul_rate": round(b / med * flops_slice / matmul_rate, 4),
                   "peak_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
                   else None}
            result["sweep"].append(row)
            print(f"forward  {mode:14s} batch {b:4d}: {row['slices_per_s']:9.1f} slices/s  ({row['ms_per_batch']} ms, "
                  f"{100 * row['fraction_of_matmul_rate']:.1f} % of the bf16 matmul rate)", flush=True)
        if mode == "bf16-weights":
            del net
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # 2. the stage's encoder step on one preprocessed volume
    ct, labels = synthetic_volume(0, vol_shape)
    t = time.perf_counter()
    prep = prepare_volume(ct.astype(np.float32), labels, cfg, 14, "synth")
    result["prepare_volume_s"] = round(time.perf_counter() - t, 3)
    result["volume_shape"] = list(vol_shape)
    mean, std = np.asarray(RAD_DINO_MEAN, np.float32), np.asarray(RAD_DINO_STD, np.float32)
    plain = torch.randn(cfg.batch_size, 3, cfg.input_size[1], cfg.input_size[2], device=device)

    @torch.inference_mode()
    def plain_fwd():
        with torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu",
                                                                                                      enabled=False):
            return model(pixel_values=plain).last_hidden_state

    if left() > 10:
        enc_times = timed(lambda: encode_prepared(model, mean, std, prep, cfg), device, warmup, repeats)
        fwd_times = timed(plain_fwd, device, warmup, repeats)
        d = cfg.input_size[0]
        result["encode_volume"] = {
            "batch_size": cfg.batch_size, "slices": d,
            "s_per_volume": round(statistics.median(enc_times), 4),
            "slices_per_s": round(d / statistics.median(enc_times), 1),
            "plain_forward_slices_per_s": round(cfg.batch_size / statistics.median(fwd_times), 1),
            "prepare_volume_s_cpu": result["prepare_volume_s"],
        }
        e = result["encode_volume"]
        print(f"encode_prepared (D={d}, batch {cfg.batch_size}): {e['slices_per_s']} slices/s vs plain forward "
              f"{e['plain_forward_slices_per_s']} slices/s; prepare_volume {vol_shape}: {e['prepare_volume_s_cpu']} s "
              f"CPU", flush=True)
    else:
        result["skipped"].append("encode_volume")

    # 3. the whole stage on a few RadGenome-sized volumes, 1 and 4 reader processes
    result["stage"] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if left() > 35 or args.tiny:
            enc_dir = root / "encoder"
            build_demo_encoder(enc_dir, hidden, layers, heads)
            manifest, masks = write_shard_inputs(root / "inputs", n_stage, vol_shape)
            for workers in (1, 4):
                if left() < 10 and not args.tiny:
                    result["skipped"].append(f"stage workers={workers}")
                    continue
                scfg = FeatureConfig.from_params({**cfg.to_params(), "workers": workers, "prefetch": max(2, workers),
                                                  "device": str(device)})
                t = time.perf_counter()
                ids = run_shard(manifest, 0, masks, str(enc_dir), None, scfg, root / f"out-{workers}.zarr",
                                threads=max(1, torch.get_num_threads()))
                dt = time.perf_counter() - t
                row = {"workers": workers, "volumes": len(ids), "wall_s": round(dt, 2),
                       "volumes_per_s": round(len(ids) / dt, 3), "slices_per_s": round(len(ids) * cfg.input_size[0] / dt, 1)}
                result["stage"].append(row)
                print(f"run_shard {len(ids)} volumes, {workers} reader process(es): {row['volumes_per_s']} volumes/s "
                      f"({row['slices_per_s']} slices/s, {row['wall_s']} s incl. model load)", flush=True)
        else:
            result["skipped"].append("stage")
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    (args.out / "gpu_features.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out / 'gpu_features.json'} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
