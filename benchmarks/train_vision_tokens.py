"""The paper's efficiency claim, measured: 356 pooled vision tokens vs all D x T = 32 x 324 = 10,368
patch tokens, same tiny LM, one stage-2 training step each.

    python benchmarks/train_vision_tokens.py --results results [--rounds 3] [--batch-size 1] [--steps 3]

Each variant runs in a fresh process (so the memory high-water mark is its own), interleaved over
rounds: the demo LM with LoRA, connector, mask extractor, the Fig. 5 prompt of a real demo training
sample (attributes and structured target) with 356 or 10,368 <img> slots, random features of the cache's
width. Reported per variant: median step time (forward + backward + AdamW step, after one warm-up
step) and peak memory = the process's RSS high-water mark minus its RSS before the first step (the
activations, gradients and optimizer state a step needs; the loaded LM excluded), then the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train_common import REPO, current_rss_mb, demo_inputs, peak_rss_mb

VARIANTS = {"pooled_356": 324, "all_patches_10368": 32 * 324 - 32}  # n_region; n_global = 32 in both


def one(results: Path, n_region: int, batch_size: int, steps: int) -> dict:
    import pandas as pd
    import torch

    from model.network import MedRegionCT
    from model.prompt import build_example, build_prompt_text, encode_prompt, encode_target, format_target
    from model.train import network_config, resolve_params
    from pipeline.feature_store import FeatureStore

    torch.manual_seed(0)
    inp = demo_inputs(results)
    p = resolve_params(2, json.dumps({"max_length": 16384, "mask_hidden": 256}))
    store = FeatureStore(inp["features"])
    config = network_config(store, p, inp["llm"], 2)
    config.n_region = n_region
    model = MedRegionCT.from_config(config, dtype=torch.float32)
    rep = pd.read_parquet(inp["train"]).iloc[0]
    attrs = pd.concat(pd.read_parquet(a) for a in inp["attributes"]).set_index("volume_id")
    prompt = encode_prompt(model.tokenizer, build_prompt_text(attrs.loc[rep["volume_id"], "prompt"],
                                                              n_vision=config.n_vision))
    ids, labels = build_example(prompt, encode_target(model.tokenizer, format_target(rep.to_dict(), 2)), 16384)
    n, c = len(ids), config.encoder_hidden
    batch = {
        "input_ids": torch.tensor([ids] * batch_size),
        "attention_mask": torch.ones((batch_size, n), dtype=torch.long),
        "labels": torch.tensor([labels] * batch_size),
        "vision": torch.randn(batch_size, config.n_vision, c),
        "mask_pooled": torch.randn(batch_size, config.n_masks, config.levels, c),
        "mask_grid": torch.rand(batch_size, config.n_masks, *config.mask_grid),
    }
    trainable = [x for x in model.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()
    rss0 = current_rss_mb()
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - t)
    return {"vision_tokens": config.n_vision, "sequence_tokens": n, "batch_size": batch_size,
            "step_s": statistics.median(times), "peak_step_mb": peak_rss_mb() - rss0, "peak_rss_mb": peak_rss_mb(),
            "threads": torch.get_num_threads()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variant", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.variant:
        print(json.dumps(one(args.results, VARIANTS[args.variant], args.batch_size, args.steps)))
        return 0
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            proc = subprocess.run([sys.executable, __file__, "--variant", v, "--results", str(args.results),
                                   "--batch-size", str(args.batch_size), "--steps", str(args.steps)],
                                  capture_output=True, encoding="utf-8", errors="replace", cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[v].append(res)
            print(f"round {r + 1} {v}: {res['sequence_tokens']} tokens x {res['batch_size']}, "
                  f"{res['step_s']:.3f} s/step, step memory {res['peak_step_mb']:.0f} MB", flush=True)
    med = {v: {"step_s": statistics.median(x["step_s"] for x in runs[v]),
               "peak_step_mb": statistics.median(x["peak_step_mb"] for x in runs[v]),
               "sequence_tokens": runs[v][0]["sequence_tokens"]} for v in VARIANTS}
    a, b = med["pooled_356"], med["all_patches_10368"]
    summary = {"median": med, "step_time_ratio": b["step_s"] / a["step_s"],
               "step_memory_ratio": b["peak_step_mb"] / a["peak_step_mb"], "runs": runs}
    print(f"356 vision tokens ({a['sequence_tokens']} in all): {a['step_s']:.3f} s/step, {a['peak_step_mb']:.0f} MB; "
          f"10,368 ({b['sequence_tokens']} in all): {b['step_s']:.3f} s/step, {b['peak_step_mb']:.0f} MB; "
          f"ratio {summary['step_time_ratio']:.1f}x time, {summary['step_memory_ratio']:.1f}x memory")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
