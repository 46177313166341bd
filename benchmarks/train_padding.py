"""Padding share per batch at the demo's length distribution (goal: < 10 %).

    python benchmarks/train_padding.py --results results [--batch-size 8] [--epochs 5]

For each stage, the training set's sequence lengths (prompt + target, as model.data builds them) are
batched by the trainer's LengthGroupedBatchSampler and, for comparison, by plain random batches and by
padding every sample to max_length (2048). Share of padded positions = 1 - real tokens / (batch x
longest), per batch (mean, max) and over all batches of `--epochs` epochs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from train_common import REPO, demo_inputs


def shares(lengths: np.ndarray, batches: list[list[int]]) -> np.ndarray:
    return np.array([1 - lengths[b].sum() / (len(b) * lengths[b].max()) for b in batches])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, default=REPO / "results")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from model.data import LengthGroupedBatchSampler, build_dataset
    from model.prompt import PLACEHOLDER_TOKENS

    inp = demo_inputs(args.results)
    tok = AutoTokenizer.from_pretrained(inp["llm"])
    tok.add_tokens([t for t in PLACEHOLDER_TOKENS if t not in tok.get_vocab()], special_tokens=True)
    out = {}
    for stage in (1, 2):
        ds = build_dataset(inp["features"], inp["attributes"], inp["train"], tok, stage=stage,
                           use_mask_tokens=stage == 2, use_attributes=stage == 2, max_length=args.max_length)
        lengths = np.asarray(ds.lengths)
        grouped, rand = [], []
        rng = np.random.default_rng(0)
        sampler = LengthGroupedBatchSampler(lengths, args.batch_size, seed=0)
        for e in range(args.epochs):
            sampler.set_epoch(e)
            grouped += sampler.batches()
            perm = rng.permutation(len(lengths))
            rand += [perm[i:i + args.batch_size].tolist() for i in range(0, len(perm), args.batch_size)]
        g, r = shares(lengths, grouped), shares(lengths, rand)
        total_g = 1 - sum(lengths[b].sum() for b in grouped) / sum(len(b) * lengths[b].max() for b in grouped)
        to_max = 1 - lengths.mean() / args.max_length
        out[f"stage{stage}"] = {
            "samples": len(lengths), "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_max": int(lengths.max()), "batches": len(grouped),
            "grouped_mean_share": float(g.mean()), "grouped_max_share": float(g.max()),
            "grouped_overall_share": float(total_g),
            "random_mean_share": float(r.mean()), "random_max_share": float(r.max()),
            "pad_to_max_length_share": float(to_max),
        }
        o = out[f"stage{stage}"]
        print(f"stage {stage}: {o['samples']} samples, length {o['length_min']}-{o['length_max']} "
              f"(median {o['length_median']:.0f}); padded share per batch of {args.batch_size}: "
              f"length-grouped mean {o['grouped_mean_share']:.1%} (max {o['grouped_max_share']:.1%}, "
              f"overall {o['grouped_overall_share']:.1%}), random batches mean {o['random_mean_share']:.1%}, "
              f"padding to {args.max_length}: {o['pad_to_max_length_share']:.1%}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
