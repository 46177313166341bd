"""Evaluate one experiment's generated reports: NLG per report and per region, and CA-F1.

    python -m pipeline.evaluate --predictions P.parquet --references R.parquet --experiment NAME \
        --out metrics.json

predictions parquet: ``volume_id, report`` (merged report) + one column per region (REGIONS).
references parquet:  ``volume_id, findings`` (full findings text) + the same region columns + the 18
                     CT-RATE label columns named exactly as CTRATE_CLASSES.

metrics.json::

    {"experiment", "n_volumes",
     "nlg": {"report": {metric: {"value", "implementation"}},
             "regions": {region: {metric: {...}, "n_pairs", "n_skipped_both_empty",
                                  "n_reference_empty", "n_prediction_empty"}}},
     "clinical": {"labeler_vs_labeler": {...},           # CA-F1: labeler(findings) vs labeler(report)
                  "labeler_vs_reference_labels": {...},  # labeler(report) vs the references' label columns
                  "labeler_on_references": {...}},       # labeler(findings) vs label columns (labeler check)
     "implementations": {...}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.constants import CTRATE_CLASSES, REGIONS
from pipeline.evaluate.clinical import clinical_scores
from pipeline.evaluate.labeler import IMPLEMENTATION as LABELER_IMPLEMENTATION
from pipeline.evaluate.labeler import label_reports
from pipeline.evaluate.nlg import IMPLEMENTATIONS as NLG_IMPLEMENTATIONS
from pipeline.evaluate.nlg import NORMALISATION, MeteorScorer, nlg_scores

CA_F1_IMPLEMENTATION = (
    "pipeline.evaluate.clinical per-class P/R/F1 on 18 CT-RATE classes; macro over classes with support"
)


def _text(x: Any) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return ""
    return str(x)


def _is_empty(x: Any) -> bool:
    return not _text(x).strip()


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to a temp file in the target folder, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def join_frames(pred: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Inner-join predictions to references on volume_id; every prediction must have a reference.

    Returns the joined frame (prediction columns suffixed ``_pred``, reference ``_ref``) and the number of
    references without a prediction (ignored).
    """
    for name, df, cols in (
        ("predictions", pred, ["volume_id", "report", *REGIONS]),
        ("references", ref, ["volume_id", "findings", *REGIONS]),
    ):
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise ValueError(f"{name} parquet lacks columns {missing}")
        dup = df["volume_id"][df["volume_id"].duplicated()].unique().tolist()
        if dup:
            raise ValueError(f"{name} parquet has duplicate volume_id(s): {dup[:10]}")
    # only the columns used here: extra columns in either file cannot collide in the join
    pred = pred[["volume_id", "report", *REGIONS]].assign(volume_id=pred["volume_id"].astype(str))
    ref_cols = ["volume_id", "findings", *REGIONS, *[c for c in CTRATE_CLASSES if c in ref.columns]]
    ref = ref[ref_cols].assign(volume_id=ref["volume_id"].astype(str))
    missing_ids = sorted(set(pred["volume_id"]) - set(ref["volume_id"]))
    if missing_ids:
        shown = ", ".join(missing_ids[:20]) + (" ..." if len(missing_ids) > 20 else "")
        raise ValueError(f"{len(missing_ids)} prediction volume_id(s) have no reference: {shown}")
    if pred.empty:
        raise ValueError("predictions parquet is empty")
    joined = pred.merge(ref, on="volume_id", how="left", suffixes=("_pred", "_ref"), validate="1:1")
    n_unused = len(set(ref["volume_id"]) - set(pred["volume_id"]))
    return joined, n_unused


def evaluate(
    pred: pd.DataFrame, ref: pd.DataFrame, experiment: str, meteor: MeteorScorer | None = None
) -> dict:
    """All metrics of one experiment as the metrics.json dict (see module docstring)."""
    joined, n_unused = join_frames(pred, ref)
    own = meteor is None
    meteor = MeteorScorer() if own else meteor
    try:
        report_nlg = nlg_scores(
            [_text(x) for x in joined["findings"]], [_text(x) for x in joined["report"]], meteor=meteor
        )
        regions: dict[str, dict] = {}
        for region in REGIONS:
            refs, hyps = joined[f"{region}_ref"].tolist(), joined[f"{region}_pred"].tolist()
            keep = [i for i in range(len(refs)) if not (_is_empty(refs[i]) and _is_empty(hyps[i]))]
            block: dict[str, Any] = {}
            if keep:
                block.update(
                    nlg_scores([_text(refs[i]) for i in keep], [_text(hyps[i]) for i in keep], meteor=meteor)
                )
            block["n_pairs"] = len(keep)
            block["n_skipped_both_empty"] = len(refs) - len(keep)
            block["n_reference_empty"] = sum(_is_empty(refs[i]) for i in keep)
            block["n_prediction_empty"] = sum(_is_empty(hyps[i]) for i in keep)
            regions[region] = block
    finally:
        if own:
            meteor.close()

    ref_lab = label_reports([_text(x) for x in joined["findings"]])
    hyp_lab = label_reports([_text(x) for x in joined["report"]])
    clinical: dict[str, Any] = {}
    block = clinical_scores(ref_lab, hyp_lab)
    block["implementation"] = f"{CA_F1_IMPLEMENTATION}; labels: {LABELER_IMPLEMENTATION} on both sides"
    clinical["labeler_vs_labeler"] = block
    label_cols = [c for c in CTRATE_CLASSES if c in joined.columns]
    if len(label_cols) == len(CTRATE_CLASSES):
        gold = joined[list(CTRATE_CLASSES)].fillna(0).to_numpy().astype(np.int64)
        block = clinical_scores(gold, hyp_lab)
        block["implementation"] = (
            f"{CA_F1_IMPLEMENTATION}; reference = label columns of the references parquet, "
            f"prediction = {LABELER_IMPLEMENTATION}"
        )
        clinical["labeler_vs_reference_labels"] = block
        block = clinical_scores(gold, ref_lab)
        block["implementation"] = (
            f"{CA_F1_IMPLEMENTATION}; labeler check: {LABELER_IMPLEMENTATION} on reference findings vs "
            "the references' label columns"
        )
        clinical["labeler_on_references"] = block
    else:
        clinical["labeler_vs_reference_labels"] = None
        clinical["note"] = (
            f"references parquet lacks label columns {sorted(set(CTRATE_CLASSES) - set(label_cols))}; "
            "label-based scores skipped"
        )

    return {
        "experiment": experiment,
        "n_volumes": int(len(joined)),
        "n_references_without_prediction": int(n_unused),
        "nlg": {"report": report_nlg, "regions": regions},
        "clinical": clinical,
        "implementations": {
            **NLG_IMPLEMENTATIONS,
            "CA-F1": CA_F1_IMPLEMENTATION,
            "labeler": LABELER_IMPLEMENTATION,
            "normalisation": NORMALISATION,
        },
    }


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def summary(metrics: dict) -> str:
    r = metrics["nlg"]["report"]
    ca = metrics["clinical"]["labeler_vs_labeler"]
    lines = [
        f"[{metrics['experiment']}] {metrics['n_volumes']} volumes",
        "  report: "
        + "  ".join(f"{k} {_fmt(r[k]['value'])}" for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L")),
        f"  CA-F1 (labeler vs labeler): macro {_fmt(ca['macro_f1'])}  micro {_fmt(ca['micro_f1'])}  "
        f"weighted {_fmt(ca['weighted_f1'])}",
    ]
    gold = metrics["clinical"].get("labeler_vs_reference_labels")
    if gold:
        lines.append(f"  F1 labeler(report) vs reference labels: macro {_fmt(gold['macro_f1'])}")
    for region, b in metrics["nlg"]["regions"].items():
        if "BLEU-4" in b:
            lines.append(
                f"  {region:12s} n={b['n_pairs']:<5d} BLEU-4 {_fmt(b['BLEU-4']['value'])}  "
                f"METEOR {_fmt(b['METEOR']['value'])}  ROUGE-L {_fmt(b['ROUGE-L']['value'])}"
            )
        else:
            lines.append(f"  {region:12s} n=0 (all pairs empty)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, type=Path)
    ap.add_argument("--references", required=True, type=Path)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args(argv)
    t0 = time.time()
    pred = pd.read_parquet(args.predictions)
    ref = pd.read_parquet(args.references)
    try:
        metrics = evaluate(pred, ref, args.experiment)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics["elapsed_s"] = round(time.time() - t0, 2)
    write_json_atomic(metrics, args.out)
    print(summary(metrics))
    print(f"  wrote {args.out} ({metrics['elapsed_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
