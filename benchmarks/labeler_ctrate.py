"""Benchmark the rule-based CT-RATE labeler against human labels.

    python benchmarks/labeler_ctrate.py [--csv PATH] [--backend rules|radbert --weights W --model-dir D]

Default data: ../shared/data/ctrate-text-classifier/train.csv next to the repository (800 reports,
columns report_text + the 18 CTRATE_CLASSES). Prints per-class precision / recall / F1 / support, the
macro / micro / weighted F1 and the speed (reports / s, best of --repeat runs). Skips (exit 0) with a message
when the file is absent.
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
    ap.add_argument("--backend", default="rules", choices=["rules", "radbert"])
    ap.add_argument("--weights", default=None, help="radbert: classifier weights")
    ap.add_argument("--model-dir", default=None, help="radbert: RadBERT config + tokenizer folder")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs (the best is reported)")
    args = ap.parse_args(argv)
    if not args.csv.exists():
        print(f"SKIP: {args.csv} not found")
        return 0

    import pandas as pd

    from pipeline.evaluate.clinical import clinical_scores
    from pipeline.evaluate.labeler import CLASSES, load_labeler

    df = pd.read_csv(args.csv)
    missing = [c for c in ("report_text", *CLASSES) if c not in df.columns]
    if missing:
        print(f"error: {args.csv} lacks columns {missing}", file=sys.stderr)
        return 2
    labeler = load_labeler(args.backend, args.weights, args.model_dir)
    texts = df["report_text"].fillna("").astype(str).tolist()
    times = []
    for _ in range(max(1, args.repeat)):
        t0 = time.perf_counter()
        pred = labeler.label_reports(texts)
        times.append(time.perf_counter() - t0)
    dt = min(times)
    s = clinical_scores(df[list(CLASSES)].to_numpy(), pred)

    def f(x):
        return "  n/a" if x is None else f"{x:.3f}"

    print(f"{labeler.IMPLEMENTATION}\n{args.csv.resolve()}: {len(df)} reports, labelled in {dt:.2f} s "
          f"= {len(df) / dt:.0f} reports/s (best of {len(times)}; runs {', '.join(f'{t:.2f}' for t in times)} s)\n")
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
