"""Score any table of report pairs with every metric variant: ``python -m pipeline.evaluate score``.

    python -m pipeline.evaluate score --predictions X.csv --references Y.csv \
        [--id-column volume_id] [--pred-column report] [--ref-column findings] \
        [--out scores.json] [--per-pair per_pair.csv|.parquet] [--java JAVA] [--wordnet DIR] \
        [--bootstrap-resamples 1000] [--seed 0]

For outside outputs (a peer's published generations, a radiologist's rewrite): both files are CSV, Parquet
or JSON-lines (they may be the same file), paired on the id column. Every NLG variant of
:mod:`pipeline.evaluate.nlg` is computed on the pairs, each with its implementation, averaging, std over
reports and 95 % bootstrap CI (:mod:`pipeline.evaluate.bootstrap`). The JSON goes to ``--out`` (default
stdout summary only); ``--per-pair`` writes one row per pair (id + each per-report variant).

Bad input is reported, never scored twice or silently (counts and ids in the JSON's ``inputs``, one line per
problem on stderr):
  * a row whose id is empty: left out (row numbers listed);
  * an id on more than one row of a file: every row of that id left out (which one would be the report?);
  * a prediction without a reference, or a reference without a prediction: left out, counted;
  * an empty text: scored (an empty generation is a bad generation), counted;
  * bytes that are not UTF-8: decoded as cp1252 with replacement (:func:`pipeline.evaluate.inputs.clean_text`),
    counted.
A missing file or column is an error naming the file and the columns it has; no pair left is an error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluate import bootstrap
from pipeline.evaluate.inputs import MAX_LISTED_IDS, clean_text, read_table
from pipeline.evaluate.nlg import (
    IMPLEMENTATIONS,
    NORMALISATION,
    PER_REPORT_KEYS,
    MeteorInBackground,
    MeteorScorer,
    nlg_scores,
    normalize_text,
    open_meteor,
)
from pipeline.evaluate.run import _pm, _uncertainty, add_scoring_options, wordnet_from_args, write_json_atomic
from pipeline.io import atomic_output


def _column(df: pd.DataFrame, column: str, path: Path, role: str) -> pd.Series:
    if column not in df.columns:
        raise ValueError(f"{path}: no {role} column {column!r} (columns: {', '.join(map(str, df.columns))}); "
                         f"name it with --{role}-column")
    return df[column]


def _side(path: Path, id_column: str, text_column: str, role: str, log: list[str]) -> tuple[dict[str, str], dict]:
    """{id: cleaned text} of one file, and its accounting (rows, empty ids, duplicated ids, repaired cells)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file ({role}s)")
    df = read_table(path)
    ids = [clean_text(v)[0].strip() for v in _column(df, id_column, path, "id")]
    texts, repaired = [], 0
    for v in _column(df, text_column, path, "pred" if role == "prediction" else "ref"):
        s, rep = clean_text(v)
        texts.append(s)
        repaired += rep
    empty_rows = [i + 1 for i, v in enumerate(ids) if not v]  # 1-based data rows
    by_id: dict[str, list[int]] = {}
    for i, v in enumerate(ids):
        if v:
            by_id.setdefault(v, []).append(i)
    duplicated = {v: rows for v, rows in by_id.items() if len(rows) > 1}
    if empty_rows:
        log.append(f"{path}: {len(empty_rows)} row(s) without an id ({id_column!r} empty), left out: rows "
                   f"{empty_rows[:20]}{' ...' if len(empty_rows) > 20 else ''}")
    for v, rows in list(duplicated.items())[:20]:
        log.append(f"{path}: id {v!r} on rows {[r + 1 for r in rows]}: all left out (which one is the {role}?)")
    if len(duplicated) > 20:
        log.append(f"{path}: ... {len(duplicated) - 20} more duplicated ids")
    if repaired:
        log.append(f"{path}: {repaired} text cell(s) were not valid UTF-8 (or held control characters): repaired")
    kept = {v: texts[rows[0]] for v, rows in by_id.items() if len(rows) == 1}
    report = {
        "file": str(path),
        "n_rows": int(len(df)),
        "n_rows_without_id": len(empty_rows),
        "rows_without_id": empty_rows[:MAX_LISTED_IDS],
        "n_duplicated_ids": len(duplicated),
        "n_rows_with_duplicated_id": int(sum(len(r) for r in duplicated.values())),
        "duplicated_ids": list(duplicated)[:MAX_LISTED_IDS],
        "n_text_cells_repaired": int(repaired),
    }
    return kept, report


def score_files(predictions: Path, references: Path, id_column: str = "volume_id", pred_column: str = "report",
                ref_column: str = "findings", meteor=None, wordnet=None,
                n_resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = bootstrap.DEFAULT_SEED,
                log: list[str] | None = None) -> tuple[dict, pd.DataFrame]:
    """(result JSON dict, per-pair frame) of the pairs in two files; see the module docstring."""
    log = [] if log is None else log
    pred, pred_report = _side(predictions, id_column, pred_column, "prediction", log)
    ref, ref_report = _side(references, id_column, ref_column, "reference", log)
    ids = [v for v in pred if v in ref]  # prediction file order
    only_pred = [v for v in pred if v not in ref]
    only_ref = [v for v in ref if v not in pred]
    if only_pred:
        log.append(f"{predictions}: {len(only_pred)} id(s) without a reference, not scored: {only_pred[:10]}")
    if only_ref:
        log.append(f"{references}: {len(only_ref)} id(s) without a prediction, not scored: {only_ref[:10]}")
    if not ids:
        raise ValueError(f"no id is in both {predictions} and {references} (after leaving out empty and duplicated "
                         "ids): nothing to score")
    hyps, refs = [pred[v] for v in ids], [ref[v] for v in ids]
    n_pred_empty = sum(not t.strip() for t in hyps)
    n_ref_empty = sum(not t.strip() for t in refs)
    if n_pred_empty or n_ref_empty:
        log.append(f"{n_pred_empty} empty prediction(s) and {n_ref_empty} empty reference(s): scored as they are")
    timings: dict[str, float] = {}
    own = meteor is None
    meteor = open_meteor() if own else meteor
    # the jar in the background: its JVM scores while Python computes the other variants
    jar = (MeteorInBackground(meteor, [([normalize_text(t) for t in refs], [normalize_text(t) for t in hyps])])
           if isinstance(meteor, MeteorScorer) else meteor)
    try:
        block = nlg_scores(refs, hyps, meteor=jar, wordnet=wordnet, per_pair=True, timings=timings)
    finally:
        if isinstance(jar, MeteorInBackground):
            jar.wait()
        if own and hasattr(meteor, "close"):
            meteor.close()
    per_pair, stats = block.pop("_per_pair"), block.pop("_bleu_stats")
    t0 = time.perf_counter()
    values = {k: np.asarray(v, dtype=np.float64) for k, v in per_pair.items()}
    _uncertainty(block, values, stats.astype(np.float64), bootstrap.multiplicities(len(ids), n_resamples, seed))
    timings["bootstrap"] = time.perf_counter() - t0
    frame = pd.DataFrame({id_column: ids, **{k: values.get(k, np.full(len(ids), np.nan)) for k in PER_REPORT_KEYS}})
    result: dict[str, Any] = {
        "n_pairs": len(ids),
        "inputs": {
            "predictions": pred_report,
            "references": ref_report,
            "columns": {"id": id_column, "prediction": pred_column, "reference": ref_column},
            "n_predictions_without_reference": len(only_pred),
            "predictions_without_reference": only_pred[:MAX_LISTED_IDS],
            "n_references_without_prediction": len(only_ref),
            "references_without_prediction": only_ref[:MAX_LISTED_IDS],
            "n_prediction_empty": n_pred_empty,
            "n_reference_empty": n_ref_empty,
        },
        "metrics": block,
        "implementations": {**IMPLEMENTATIONS, "normalisation": NORMALISATION},
        "uncertainty": bootstrap.description(n_resamples, seed),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
    }
    return result, frame


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate score", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, type=Path, help=".csv, .parquet or .jsonl")
    ap.add_argument("--references", required=True, type=Path, help="may be the predictions file itself")
    ap.add_argument("--id-column", default="volume_id", help="column pairing the two files (default: %(default)s)")
    ap.add_argument("--pred-column", default="report", help="predictions' text column (default: %(default)s)")
    ap.add_argument("--ref-column", default="findings", help="references' text column (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help="result JSON (metrics with std / CI, input accounting)")
    ap.add_argument("--per-pair", type=Path, default=None, help="per-pair scores, .csv or .parquet")
    add_scoring_options(ap)
    args = ap.parse_args(argv)
    log: list[str] = []
    meteor = None
    try:
        wordnet = wordnet_from_args(args)
        meteor = open_meteor(args.java)
        result, frame = score_files(args.predictions, args.references, args.id_column, args.pred_column,
                                    args.ref_column, meteor=meteor, wordnet=wordnet,
                                    n_resamples=args.bootstrap_resamples, seed=args.seed, log=log)
    except (ValueError, FileNotFoundError) as e:
        for line in log:
            print(f"warning: {line}", file=sys.stderr)
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if hasattr(meteor, "close"):
            meteor.close()
    for line in log:
        print(f"warning: {line}", file=sys.stderr)
    timings = result.pop("timings_s")
    if args.out:
        write_json_atomic(result, args.out)
    if args.per_pair:
        with atomic_output(args.per_pair) as tmp:
            if args.per_pair.suffix.lower() == ".csv":
                frame.to_csv(tmp, index=False)
            else:
                frame.to_parquet(tmp, index=False)
    print(f"{result['n_pairs']} pairs scored ({args.predictions} vs {args.references})")
    for key, entry in result["metrics"].items():
        reason = f"  ({entry['reason']})" if entry.get("status") == "not run" else ""
        print(f"  {key:26s} {_pm(entry):>38s}  [{entry['averaging']}]{reason}")
    print(f"  timings (s): {json.dumps(timings)}")
    for path in (args.out, args.per_pair):
        if path:
            print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
