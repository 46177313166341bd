"""Benchmark the rule-based CT-RATE labeler against human labels.

    python benchmarks/labeler_ctrate.py [--csv PATH]

Default data: ../shared/data/ctrate-text-classifier/train.csv next to the repository (800 reports,
columns report_text + the 18 CTRATE_CLASSES). Prints per-class precision / recall / F1 / support and the
macro / micro / weighted F1. Skips (exit 0) with a message when the file is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_CSV = REPO / ".." / "shared" / "data" / "ctrate-text-classifier" / "train.csv"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"SKIP: {args.csv} not found")
        return 0

    import pandas as pd

    from pipeline.evaluate.clinical import clinical_scores
    from pipeline.evaluate.labeler import CLASSES, IMPLEMENTATION, label_reports

    df = pd.read_csv(args.csv)
    missing = [c for c in ("report_text", *CLASSES) if c not in df.columns]
    if missing:
        print(f"error: {args.csv} lacks columns {missing}", file=sys.stderr)
        return 2
    t0 = time.time()
    pred = label_reports(df["report_text"].fillna("").astype(str).tolist())
    dt = time.time() - t0
    s = clinical_scores(df[list(CLASSES)].to_numpy(), pred)

    def f(x):
        return "  n/a" if x is None else f"{x:.3f}"

    print(f"{IMPLEMENTATION}\n{args.csv.resolve()}: {len(df)} reports, labelled in {dt:.1f} s\n")
    print(f"{'class':36s} {'prec':>6s} {'recall':>6s} {'F1':>6s} {'support':>7s} {'pred':>5s}")
    for c in CLASSES:
        r = s["per_class"][c]
        print(
            f"{c:36s} {f(r['precision']):>6s} {f(r['recall']):>6s} {f(r['f1']):>6s} "
            f"{r['support']:7d} {r['predicted']:5d}"
        )
    defined = [c for c in CLASSES if s["per_class"][c]["f1"] is not None]
    worst = min(defined, key=lambda c: s["per_class"][c]["f1"])
    print(
        f"\nmacro-F1 {f(s['macro_f1'])}  micro-F1 {f(s['micro_f1'])}  weighted-F1 {f(s['weighted_f1'])}  "
        f"({s['n_classes_in_macro']} classes in macro; worst: {worst} {f(s['per_class'][worst]['f1'])})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
