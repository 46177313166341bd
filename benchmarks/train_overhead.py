"""Trainer overhead: tokens/s of the real training loop vs a bare forward/backward/step loop.

    python benchmarks/train_overhead.py --results results [--rounds 3] [--epochs 2] [--stage 2]

Both sides train the same model (same config, seed, stage-1 init) on the same batches (the trainer's
length-grouped sampler, same seed and epochs):
  * trainer: `python -m model.train` (Accelerator, data loading from the Zarr cache, accumulate/clip,
    scheduler, logging, progress bar); its tokens/s is the `done` record's `tokens_per_s` (non-padding
    tokens / time in the training loop; validation and checkpoint writes are timed apart and excluded);
  * bare: the batches are read and collated into memory first, then only
    forward, backward, clip, optimizer and scheduler step, zero_grad are timed.
Each side runs in its own process, interleaved (trainer, bare, trainer, bare, ...) because the machine
is shared; the medians and the ratio of the medians are printed. Goal: trainer >= 0.9 x bare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from train_common import REPO, build_model_and_data, demo_inputs, trainer_args

PARAMS = {"checkpoint_every": 0, "log_every": 1000, "seed": 0}


def bare(results: Path, stage: int, params: dict) -> dict:
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from model.data import Collator, LengthGroupedBatchSampler

    inp = demo_inputs(results)
    model, ds, p = build_model_and_data(inp, stage, params)
    sampler = LengthGroupedBatchSampler(ds.lengths, p["batch_size"], seed=p["seed"])
    collate = Collator(model.tokenizer.pad_token_id)
    batches = []
    for epoch in range(p["epochs"]):
        sampler.set_epoch(epoch)
        batches += [collate([ds[i] for i in b]) for b in sampler]
    trainable = [x for x in model.parameters() if x.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=p["lr"])
    sched = get_cosine_schedule_with_warmup(opt, int(p["warmup_ratio"] * len(batches)), len(batches))
    model.train()
    tokens = 0
    t = time.perf_counter()
    for b in batches:
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, p["max_grad_norm"])
        opt.step()
        sched.step()
        opt.zero_grad()
        tokens += int(b["attention_mask"].sum())
    loss.item()
    dt = time.perf_counter() - t
    return {"tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "steps": len(batches)}


def trainer(results: Path, stage: int, params: dict) -> dict:
    inp = demo_inputs(results)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        proc = subprocess.run([sys.executable, "-m", "model.train", *trainer_args(inp, stage, out, params)],
                              cwd=REPO, capture_output=True, encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        recs = [json.loads(line) for line in (out / "train_log.jsonl").read_text(encoding="utf-8").splitlines()]
    done = recs[-1]
    return {"tokens": done["train_tokens"], "seconds": done["loop_s"], "tokens_per_s": done["tokens_per_s"],
            "steps": done["step"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--side", choices=("bare", "trainer"), help=argparse.SUPPRESS)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    params = {**PARAMS, "epochs": args.epochs, "batch_size": args.batch_size, "grad_accum": 1}
    if args.side:
        res = (bare if args.side == "bare" else trainer)(args.results, args.stage, params)
        print(json.dumps(res))
        return 0
    runs: dict[str, list[dict]] = {"trainer": [], "bare": []}
    for r in range(args.rounds):
        for side in ("trainer", "bare"):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--results", str(args.results),
                                   "--stage", str(args.stage), "--epochs", str(args.epochs),
                                   "--batch-size", str(args.batch_size)],
                                  capture_output=True, encoding="utf-8", errors="replace", cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(proc.stderr[-3000:])
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[side].append(res)
            print(f"round {r + 1} {side:8s} {res['tokens']} tokens in {res['seconds']:.1f} s: "
                  f"{res['tokens_per_s']:.0f} tokens/s", flush=True)
    med = {s: statistics.median(x["tokens_per_s"] for x in v) for s, v in runs.items()}
    ratios = [t["tokens_per_s"] / b["tokens_per_s"] for t, b in zip(runs["trainer"], runs["bare"])]
    summary = {"stage": args.stage, "epochs": args.epochs, "batch_size": args.batch_size,
               "median_tokens_per_s": med, "ratio_of_medians": med["trainer"] / med["bare"],
               "per_round_ratios": ratios, "runs": runs}
    print(f"trainer {med['trainer']:.0f} tokens/s, bare loop {med['bare']:.0f} tokens/s: "
          f"ratio {summary['ratio_of_medians']:.3f} (per round {', '.join(f'{x:.3f}' for x in ratios)}); goal >= 0.9")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
