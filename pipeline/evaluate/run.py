"""Evaluate one experiment's generated reports: NLG per report and per region, CA-F1, GREEN, LLM judge.

    python -m pipeline.evaluate --predictions P.parquet --references R.parquet --experiment NAME \
        --out metrics.json [--labeler rules|radbert --labeler-weights W --labeler-model-dir D] \
        [--green green.json] [--judge judge.json] [--java JAVA]

Inputs and their tolerances: :mod:`pipeline.evaluate.inputs` (predictions without a reference are reported,
not scored; non-UTF-8 text is repaired and counted; missing region columns count as empty). GREEN and the
judge run in their own CLIs (``pipeline.evaluate.green`` / ``.judge``, a GPU / an endpoint) and their JSON
is merged here; without one the block says ``"status": "not run"`` and why.

metrics.json::

    {"experiment", "n_volumes" (pairs scored), "inputs": {...},
     "nlg": {"report": {metric: {"value", "implementation", "averaging"[, "status", "reason"]}},
             "regions": {region: {metric: {...}, "n_pairs", "n_skipped_both_empty",
                                  "n_reference_empty", "n_prediction_empty"}}},
     "clinical": {"labeler_vs_labeler": {...},           # CA-F1: labeler(findings) vs labeler(report)
                  "labeler_vs_reference_labels": {...},  # labeler(report) vs the references' label columns
                  "labeler_on_references": {...}},       # labeler(findings) vs label columns (labeler check)
     "green": {...}, "judge": {...},
     "implementations": {...}, "meteor_jvm_starts": 1}

`evaluate()` also returns "timings_s" ({part: seconds}); the CLI prints it and the total time to its
log instead of writing them into metrics.json, so that two runs on the same inputs write the same file.

Every number carries its implementation and averaging: NLG entries each, clinical blocks by
``implementation`` + their macro/micro/weighted keys, GREEN/judge by their ``implementation`` and
``averaging``.
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
from pipeline.evaluate.inputs import Pairs, load_pairs, pair_frames
from pipeline.evaluate.labeler import BACKENDS, load_labeler
from pipeline.evaluate.nlg import (
    IMPLEMENTATIONS as NLG_IMPLEMENTATIONS,
)
from pipeline.evaluate.nlg import (
    NORMALISATION,
    MeteorNotRun,
    MeteorScorer,
    nlg_scores,
    open_meteor,
)

CA_F1_IMPLEMENTATION = (
    "pipeline.evaluate.clinical per-class P/R/F1 on 18 CT-RATE classes; macro over classes with support, "
    "micro over pooled counts, weighted by support"
)


def _is_empty(x: Any) -> bool:
    return not str(x or "").strip()


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON to a temp file in the target folder, then ``os.replace`` it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, allow_nan=False, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def join_frames(pred: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Backwards-compatible wrapper of :func:`pipeline.evaluate.inputs.pair_frames`."""
    pairs = pair_frames(pred, ref)
    return pairs.frame, pairs.report["n_references_without_prediction"]


def not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason, "value": None}


def load_adapter_result(path: str | os.PathLike | None, name: str, config_key: str) -> dict:
    """A GREEN / judge JSON written by its CLI, or a not-run block saying why there is none."""
    if path is None:
        return not_run(f"{name} adapter not configured (evaluate.{config_key} is null)")
    with open(path, encoding="utf-8") as f:
        block = json.load(f)
    block.pop("per_report", None)  # kept in the adapter's own file
    block.pop("elapsed_s", None)  # a run-time measurement (in the adapter's own file): metrics.json holds results
    return block


def evaluate(
    pred: pd.DataFrame | Pairs,
    ref: pd.DataFrame | None,
    experiment: str,
    meteor: MeteorScorer | MeteorNotRun | None = None,
    labeler=None,
    java: str | None = None,
    green: dict | None = None,
    judge: dict | None = None,
) -> dict:
    """All metrics of one experiment as the metrics.json dict (see module docstring).

    ``meteor``: a shared scorer (not closed here), a :class:`MeteorNotRun`, or None (one JVM is started for
    the whole evaluation - report and all regions - and closed at the end).
    """
    pairs = pred if isinstance(pred, Pairs) else pair_frames(pred, ref)
    joined = pairs.frame
    labeler = labeler or load_labeler("rules")
    own = meteor is None
    starts_before = MeteorScorer.starts
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    meteor = open_meteor(java) if own else meteor
    timings["meteor_jvm_start"] = time.perf_counter() - t0
    try:
        report_nlg = nlg_scores(joined["findings"].tolist(), joined["report"].tolist(), meteor=meteor, timings=timings)
        regions: dict[str, dict] = {}
        for region in REGIONS:
            refs, hyps = joined[f"{region}_ref"].tolist(), joined[f"{region}_pred"].tolist()
            keep = [i for i in range(len(refs)) if not (_is_empty(refs[i]) and _is_empty(hyps[i]))]
            block: dict[str, Any] = {}
            if keep:
                block.update(
                    nlg_scores([refs[i] for i in keep], [hyps[i] for i in keep], meteor=meteor, timings=timings)
                )
            block["n_pairs"] = len(keep)
            block["n_skipped_both_empty"] = len(refs) - len(keep)
            block["n_reference_empty"] = sum(_is_empty(refs[i]) for i in keep)
            block["n_prediction_empty"] = sum(_is_empty(hyps[i]) for i in keep)
            regions[region] = block
    finally:
        if own and isinstance(meteor, MeteorScorer):
            meteor.close()

    t0 = time.perf_counter()
    ref_lab = labeler.label_reports(joined["findings"].tolist())
    hyp_lab = labeler.label_reports(joined["report"].tolist())
    timings["labeler"] = time.perf_counter() - t0
    impl = labeler.IMPLEMENTATION
    clinical: dict[str, Any] = {}
    block = clinical_scores(ref_lab, hyp_lab)
    block["implementation"] = f"{CA_F1_IMPLEMENTATION}; labels: {impl} on both sides"
    clinical["labeler_vs_labeler"] = block
    label_cols = [c for c in CTRATE_CLASSES if c in joined.columns]
    if len(label_cols) == len(CTRATE_CLASSES):
        gold = joined[list(CTRATE_CLASSES)].fillna(0).to_numpy().astype(np.int64)
        block = clinical_scores(gold, hyp_lab)
        block["implementation"] = (
            f"{CA_F1_IMPLEMENTATION}; reference = label columns of the references, prediction = {impl}"
        )
        clinical["labeler_vs_reference_labels"] = block
        block = clinical_scores(gold, ref_lab)
        block["implementation"] = (
            f"{CA_F1_IMPLEMENTATION}; labeler check: {impl} on reference findings vs the references' label columns"
        )
        clinical["labeler_on_references"] = block
    else:
        clinical["labeler_vs_reference_labels"] = None
        clinical["note"] = (
            f"references lack label columns {sorted(set(CTRATE_CLASSES) - set(label_cols))}; "
            "label-based scores skipped"
        )

    return {
        "experiment": experiment,
        "n_volumes": int(len(joined)),
        "n_references_without_prediction": pairs.report["n_references_without_prediction"],
        "inputs": pairs.report,
        "nlg": {"report": report_nlg, "regions": regions},
        "clinical": clinical,
        "green": green if green is not None else not_run("GREEN adapter not configured (evaluate.green is null)"),
        "judge": judge if judge is not None else not_run("LLM judge not configured (evaluate.judge is null)"),
        "meteor_jvm_starts": MeteorScorer.starts - starts_before,
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "implementations": {
            **NLG_IMPLEMENTATIONS,
            "CA-F1": CA_F1_IMPLEMENTATION,
            "labeler": impl,
            "normalisation": NORMALISATION,
        },
    }


def outcome_blocks(predictions: Path, references: Path, skipped_qc: list[Path]) -> dict:
    """metrics.json's `skipped` block (volumes the data stages skipped, `pipeline.skipped`) and its
    `degenerate` block (`pipeline.evaluate.degenerate`)."""
    from pipeline.evaluate.degenerate import degenerate_block
    from pipeline.evaluate.inputs import read_table
    from pipeline.skipped import skipped_volumes

    skipped = skipped_volumes(skipped_qc).block(read_table(references)["volume_id"].astype(str))
    return {"skipped": skipped, "n_skipped_volumes": skipped["n_volumes"],
            "degenerate": degenerate_block(read_table(predictions))}


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _val(entry: dict) -> str:
    if entry.get("status") == "not run":
        return "not run"
    return _fmt(entry.get("value"))


def summary(metrics: dict) -> str:
    r = metrics["nlg"]["report"]
    ca = metrics["clinical"]["labeler_vs_labeler"]
    inp = metrics.get("inputs", {})
    lines = [f"[{metrics['experiment']}] {metrics['n_volumes']} volumes scored"]
    orphans = inp.get("predictions_without_reference", {}).get("count", 0)
    if orphans:
        lines.append(f"  {orphans} prediction(s) without a reference: reported, not scored")
    for key in ("BLEU-4", "BLEU-4 report-mean", "ROUGE-L", "METEOR", "METEOR report-mean", "METEOR-NLTK report-mean"):
        lines.append(f"  {key:26s} {_val(r[key]):>8s}  [{r[key]['averaging']}] {r[key]['implementation']}")
    if r["METEOR"].get("status") == "not run":
        lines.append(f"  METEOR not run: {r['METEOR']['reason']}")
    lines.append(
        f"  CA-F1 (labeler vs labeler): macro {_fmt(ca['macro_f1'])}  micro {_fmt(ca['micro_f1'])}  "
        f"weighted {_fmt(ca['weighted_f1'])}"
    )
    gold = metrics["clinical"].get("labeler_vs_reference_labels")
    if gold:
        lines.append(f"  F1 labeler(report) vs reference labels: macro {_fmt(gold['macro_f1'])}")
    for key in ("skipped", "degenerate"):
        if key in metrics:
            b = metrics[key]
            lines.append(f"  {key}: " + (b["note"] if key == "degenerate" else f"{b['n_volumes']} volume(s) {b['by_stage']}"))
    for name in ("green", "judge"):
        b = metrics.get(name) or {}
        lines.append(f"  {name}: {_val(b)}" + (f" ({b.get('reason')})" if b.get("reason") else ""))
    for region, b in metrics["nlg"]["regions"].items():
        if "BLEU-4" in b:
            lines.append(
                f"  {region:12s} n={b['n_pairs']:<5d} BLEU-4 {_val(b['BLEU-4'])}  "
                f"METEOR {_val(b['METEOR'])}  ROUGE-L {_val(b['ROUGE-L'])}"
            )
        else:
            lines.append(f"  {region:12s} n=0 (all pairs empty)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--predictions", required=True, type=Path, help=".parquet, .csv or .jsonl")
    ap.add_argument("--references", required=True, type=Path)
    ap.add_argument("--experiment", required=True)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--labeler", default="rules", choices=BACKENDS)
    ap.add_argument("--labeler-weights", default=None, help="radbert: classifier weights (.safetensors/.pt)")
    ap.add_argument("--labeler-model-dir", default=None, help="radbert: folder with config + tokenizer")
    ap.add_argument("--labeler-device", default="cpu")
    ap.add_argument("--green", type=Path, default=None, help="green.json from python -m pipeline.evaluate.green")
    ap.add_argument("--judge", type=Path, default=None, help="judge.json from python -m pipeline.evaluate.judge")
    ap.add_argument("--java", default=None, help="Java executable for the METEOR jar (default $MEDREGION_JAVA/java)")
    ap.add_argument("--skipped-qc", nargs="*", default=[], type=Path,
                    help="QC tables of the data stages: their skipped volumes are counted in metrics.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        pairs = load_pairs(args.predictions, args.references)
        labeler = load_labeler(args.labeler, args.labeler_weights, args.labeler_model_dir, args.labeler_device)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    green = load_adapter_result(args.green, "GREEN", "green")
    judge = load_adapter_result(args.judge, "LLM judge", "judge")
    metrics = evaluate(pairs, None, args.experiment, labeler=labeler, java=args.java, green=green, judge=judge)
    metrics.update(outcome_blocks(args.predictions, args.references, args.skipped_qc))
    timings = metrics.pop("timings_s", {})  # run-time measurements: the log, not the results file
    write_json_atomic(metrics, args.out)
    print(summary(metrics))
    print(f"  timings (s): {json.dumps(timings)}")
    print(f"  wrote {args.out} ({time.time() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
