"""Benchmark: score 1,564 real-length report pairs end to end with one METEOR JVM.

    python benchmarks/eval_scoring.py [--csv PATH] [--pairs 1564] [--out metrics.json]

1,564 = the RadGenome-Chest CT test size. Pairs are made by repeating the 800 real CT-RATE reports of
../shared/data/ctrate-text-classifier/train.csv (report i % 800 as reference, report (7 i + 3) % 800 as
"prediction": real length, real vocabulary, realistic partial overlap); region texts come from the free-text
sentence classifier. The whole ``pipeline.evaluate.run.evaluate`` runs: NLG on the merged report and the six
regions (BLEU corpus + per report, METEOR jar corpus + per report, NLTK-style METEOR, ROUGE-L), the labeler on
both sides and CA-F1. Prints the time of each part and checks that Java started once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CSV = REPO / ".." / "shared" / "data" / "ctrate-text-classifier" / "train.csv"


def make_pairs(csv: Path, n: int):
    import pandas as pd

    from pipeline.constants import CTRATE_CLASSES, REGIONS
    from pipeline.evaluate.sections import split_report

    df = pd.read_csv(csv)
    texts = df["report_text"].fillna("").astype(str).tolist()
    ref_idx = [i % len(texts) for i in range(n)]
    hyp_idx = [(7 * i + 3) % len(texts) for i in range(n)]
    ids = [f"bench_{i}" for i in range(n)]
    ref_regions = [split_report(texts[i]) for i in ref_idx]
    hyp_regions = [split_report(texts[i]) for i in hyp_idx]
    ref = pd.DataFrame({"volume_id": ids, "findings": [texts[i] for i in ref_idx],
                        **{r: [x[r] for x in ref_regions] for r in REGIONS}})
    for c in CTRATE_CLASSES:
        ref[c] = df[c].to_numpy()[ref_idx]
    pred = pd.DataFrame({"volume_id": ids, "report": [texts[i] for i in hyp_idx],
                         **{r: [x[r] for x in hyp_regions] for r in REGIONS}})
    return pred, ref


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--pairs", type=int, default=1564)
    ap.add_argument("--out", type=Path, default=None, help="also write the metrics.json here")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"SKIP: {args.csv} not found")
        return 0

    from pipeline.evaluate.nlg import MeteorScorer
    from pipeline.evaluate.run import evaluate, summary, write_json_atomic

    pred, ref = make_pairs(args.csv, args.pairs)
    words = ref["findings"].str.split().str.len()
    print(f"{len(pred)} pairs from {args.csv.resolve()}: reference length {words.mean():.0f} words on average "
          f"(min {words.min()}, max {words.max()})")
    t0 = time.perf_counter()
    metrics = evaluate(pred, ref, "benchmark")
    total = time.perf_counter() - t0
    print(summary(metrics))
    t = metrics["timings_s"]
    print("\ntime per part (s, report + 6 regions): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    print(f"end to end: {total:.1f} s for {len(pred)} pairs; JVM starts: {metrics['meteor_jvm_starts']} "
          f"(MeteorScorer.starts in this process: {MeteorScorer.starts})")
    if args.out:
        metrics["elapsed_s"] = round(total, 2)
        write_json_atomic(metrics, args.out)
        print(f"wrote {args.out}")
    if metrics["meteor_jvm_starts"] > 1:
        print("error: more than one Java start", file=sys.stderr)
        return 1
    json.dumps(metrics, allow_nan=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
