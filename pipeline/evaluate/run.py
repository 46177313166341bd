"""Evaluate one experiment's generated reports: NLG per report and per region, CA-F1, GREEN, LLM judge.

    python -m pipeline.evaluate --predictions P.parquet --references R.parquet --experiment NAME \
        --out metrics.json [--params-json '{"labeler": {"backend": "rules"}, "java": null, "wordnet": null,
        "bootstrap": {"resamples": 1000, "seed": 0}}'] [--green green.json] [--judge judge.json] \
        [--scores-out scores.parquet]
    python -m pipeline.evaluate score --predictions X.csv --references Y.csv ...   (pipeline.evaluate.score)

Inputs and their tolerances: :mod:`pipeline.evaluate.inputs` (predictions without a reference are reported,
not scored; non-UTF-8 text is repaired and counted; missing region columns count as empty). GREEN and the
judge run in their own CLIs (``pipeline.evaluate.green`` / ``.judge``, a GPU / an endpoint) and their JSON
is merged here; without one the block says ``"status": "not run"`` and why.

metrics.json::

    {"experiment", "n_volumes" (pairs scored), "inputs": {...},
     "nlg": {"report": {metric: {"value", "implementation", "averaging", "std", "ci95"[, "status", "reason"]}},
             "regions": {region: {metric: {...}, "n_pairs", "n_skipped_both_empty",
                                  "n_reference_empty", "n_prediction_empty"}}},
     "clinical": {"labeler_vs_labeler": {...},           # CA-F1: labeler(findings) vs labeler(report), + *_ci95
                  "labeler_vs_reference_labels": {...},  # labeler(report) vs the references' label columns
                  "labeler_on_references": {...}},       # labeler(findings) vs label columns (labeler check)
     "green": {...}, "judge": {...},
     "implementations": {...}, "meteor_jvm_starts": 1, "uncertainty": "...", "bootstrap": {"n_resamples", "seed"}}

``std`` (over reports) and ``ci95`` (bootstrap over volumes) as :mod:`pipeline.evaluate.bootstrap` defines
them. ``--scores-out`` writes scores.parquet, one row per volume: ``volume_id``; ``<part>/<metric>`` for
part = report and each region and every per-report metric (NaN: region empty on both sides, or metric not
run); ``<part>/pycoco BLEU <stat>`` (testlen, reflen, guess-n, correct-n: corpus BLEU of any subset is
:func:`pipeline.evaluate.nlg.corpus_bleu_from_stats` of their sums); ``reference label/<class>`` and
``prediction label/<class>`` (the labeler's 18 CT-RATE labels of the findings and the generated report).

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.constants import CTRATE_CLASSES, REGIONS
from pipeline.evaluate import bootstrap
from pipeline.evaluate.clinical import clinical_scores
from pipeline.evaluate.inputs import Pairs, load_pairs, pair_frames
from pipeline.evaluate.labeler import BACKENDS, load_labeler
from pipeline.evaluate.nlg import (
    IMPLEMENTATIONS as NLG_IMPLEMENTATIONS,
)
from pipeline.evaluate.nlg import (
    NORMALISATION,
    PER_REPORT_KEYS,
    PYCOCO_BLEU_STATS,
    MeteorInBackground,
    MeteorNotRun,
    MeteorScorer,
    corpus_bleu_from_stats,
    nlg_scores,
    normalize_text,
    open_meteor,
    open_wordnet,
)
from pipeline.io import atomic_output, write_parquet
from pipeline.stage_config import SettingsError, parse_settings

CA_F1_IMPLEMENTATION = (
    "pipeline.evaluate.clinical per-class P/R/F1 on 18 CT-RATE classes; macro over classes with support, "
    "micro over pooled counts, weighted by support"
)


def _is_empty(x: Any) -> bool:
    return not str(x or "").strip()


def write_json_atomic(obj: Any, path: str | os.PathLike) -> None:
    """Write JSON (no NaN, non-ASCII kept) atomically, through `pipeline.io.atomic_output`."""
    with atomic_output(Path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, allow_nan=False, ensure_ascii=False)
        f.write("\n")


def join_frames(pred: pd.DataFrame, ref: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Backwards-compatible wrapper of :func:`pipeline.evaluate.inputs.pair_frames`."""
    pairs = pair_frames(pred, ref)
    return pairs.frame, pairs.report["n_references_without_prediction"]


def not_run(reason: str) -> dict:
    return {"status": "not run", "reason": reason, "value": None}


def load_adapter_result(path: str | os.PathLike | None, name: str, config_key: str,
                        n_resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = bootstrap.DEFAULT_SEED) -> dict:
    """A GREEN / judge JSON written by its CLI, or a not-run block saying why there is none. Its per-report
    scores (GREEN's ``green``, the judge's ``score``; missing answers left out) give ``std`` and ``ci95``."""
    if path is None:
        return not_run(f"{name} adapter not configured (evaluate.{config_key} is null)")
    with open(path, encoding="utf-8") as f:
        block = json.load(f)
    rows = block.get("per_report") or []
    values = np.array([r.get("green", r.get("score")) for r in rows], dtype=np.float64)  # None -> NaN
    if block.get("value") is not None and np.isfinite(values).any():
        b = bootstrap.mean_block(values, bootstrap.multiplicities(len(values), n_resamples, seed))
        block["std"], block["ci95"] = b["std"], b["ci95"]
    block.pop("per_report", None)  # kept in the adapter's own file
    block.pop("elapsed_s", None)  # a run-time measurement (in the adapter's own file): metrics.json holds results
    return block


def _uncertainty(block: dict, values: dict[str, np.ndarray], stats: np.ndarray | None, counts: np.ndarray) -> None:
    """Add ``std`` and ``ci95`` to every entry of one NLG block (see :mod:`pipeline.evaluate.bootstrap`).

    ``values``: per-volume scores of the report-mean entries (NaN: no pair for that volume);
    ``stats``: per-volume pycocoevalcap BLEU statistics (NaN rows: no pair) for the corpus BLEU entries.
    """
    for key, entry in block.items():
        if not isinstance(entry, dict) or entry.get("status") == "not run" or "averaging" not in entry:
            continue
        if key in values:
            b = bootstrap.mean_block(values[key], counts)
            entry["std"], entry["ci95"] = b["std"], b["ci95"]
        elif key.startswith("BLEU-") and stats is not None:
            present = np.isfinite(stats[:, 0])
            boot = corpus_bleu_from_stats(counts[:, present] @ stats[present])[:, int(key[5]) - 1]
            entry["std"], entry["ci95"] = None, bootstrap.interval(boot)
        else:
            entry["std"], entry["ci95"] = None, None
            entry["ci95_note"] = "the METEOR jar's corpus aggregate: only the jar aggregates its statistics"


def _block_with_scores(refs: list[str], hyps: list[str], keep: list[int], n: int, prefix: str,
                       columns: dict[str, np.ndarray], **kw) -> tuple[dict, dict[str, np.ndarray], np.ndarray]:
    """nlg_scores of the kept pairs; their per-pair scores spread over all n volumes (NaN elsewhere) into
    ``columns`` under ``prefix``; returns (block, per-volume values, per-volume BLEU statistics)."""
    block = nlg_scores([refs[i] for i in keep], [hyps[i] for i in keep], per_pair=True, **kw)
    per_pair, stats = block.pop("_per_pair"), block.pop("_bleu_stats")
    values: dict[str, np.ndarray] = {}
    for key in PER_REPORT_KEYS:
        v = np.full(n, np.nan)
        if key in per_pair:
            v[keep] = per_pair[key]
        values[key] = v
        columns[f"{prefix}/{key}"] = v
    full = np.full((n, len(PYCOCO_BLEU_STATS)), np.nan)
    full[keep] = stats
    for j, name in enumerate(PYCOCO_BLEU_STATS):
        columns[f"{prefix}/pycoco BLEU {name}"] = full[:, j]
    return block, values, full


def score_experiment(
    pred: pd.DataFrame | Pairs,
    ref: pd.DataFrame | None,
    experiment: str,
    meteor: MeteorScorer | MeteorNotRun | None = None,
    labeler=None,
    java: str | None = None,
    green: dict | None = None,
    judge: dict | None = None,
    wordnet=None,
    n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
    seed: int = bootstrap.DEFAULT_SEED,
) -> tuple[dict, pd.DataFrame]:
    """(metrics.json dict, per-volume scores frame) of one experiment; see the module docstring.

    ``meteor``: a shared scorer (not closed here), a :class:`MeteorNotRun`, or None (one JVM is started for
    the whole evaluation - report and all regions - and closed at the end). ``wordnet``: a reader from
    :func:`pipeline.evaluate.nlg.open_wordnet`, a :class:`WordNetNotRun`, or None (Debian's folder).
    """
    pairs = pred if isinstance(pred, Pairs) else pair_frames(pred, ref)
    joined = pairs.frame
    n = len(joined)
    labeler = labeler or load_labeler("rules")
    own = meteor is None
    starts_before = MeteorScorer.starts
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    meteor = open_meteor(java) if own else meteor
    timings["meteor_jvm_start"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    wordnet = open_wordnet() if wordnet is None else wordnet
    timings["wordnet_load"] = time.perf_counter() - t0
    counts = bootstrap.multiplicities(n, n_resamples, seed)
    columns: dict[str, Any] = {"volume_id": joined["volume_id"].astype(str).to_numpy()}
    t_boot = 0.0
    region_keep = {}
    for region in REGIONS:
        refs, hyps = joined[f"{region}_ref"].tolist(), joined[f"{region}_pred"].tolist()
        region_keep[region] = [i for i in range(n) if not (_is_empty(refs[i]) and _is_empty(hyps[i]))]
    jar = meteor
    if isinstance(meteor, MeteorScorer):
        # every jar job starts now, in the background: the JVM scores while Python computes the rest
        jobs = [(joined["findings"].tolist(), joined["report"].tolist())]
        for region, keep in region_keep.items():
            if keep:
                refs, hyps = joined[f"{region}_ref"].tolist(), joined[f"{region}_pred"].tolist()
                jobs.append(([refs[i] for i in keep], [hyps[i] for i in keep]))
        jar = MeteorInBackground(meteor, [([normalize_text(t) for t in r], [normalize_text(t) for t in h])
                                          for r, h in jobs])
    try:
        t0 = time.perf_counter()
        ref_lab = labeler.label_reports(joined["findings"].tolist())
        hyp_lab = labeler.label_reports(joined["report"].tolist())
        timings["labeler"] = time.perf_counter() - t0
        kw = {"meteor": jar, "timings": timings, "wordnet": wordnet}
        report_nlg, values, stats = _block_with_scores(
            joined["findings"].tolist(), joined["report"].tolist(), list(range(n)), n, "report", columns, **kw
        )
        t1 = time.perf_counter()
        _uncertainty(report_nlg, values, stats, counts)
        t_boot += time.perf_counter() - t1
        regions: dict[str, dict] = {}
        for region in REGIONS:
            refs, hyps = joined[f"{region}_ref"].tolist(), joined[f"{region}_pred"].tolist()
            keep = region_keep[region]
            block: dict[str, Any] = {}
            if keep:
                block, values, stats = _block_with_scores(refs, hyps, keep, n, region, columns, **kw)
                t1 = time.perf_counter()
                _uncertainty(block, values, stats, counts)
                t_boot += time.perf_counter() - t1
            else:
                for key in PER_REPORT_KEYS:
                    columns[f"{region}/{key}"] = np.full(n, np.nan)
                for name in PYCOCO_BLEU_STATS:
                    columns[f"{region}/pycoco BLEU {name}"] = np.full(n, np.nan)
            block["n_pairs"] = len(keep)
            block["n_skipped_both_empty"] = len(refs) - len(keep)
            block["n_reference_empty"] = sum(_is_empty(refs[i]) for i in keep)
            block["n_prediction_empty"] = sum(_is_empty(hyps[i]) for i in keep)
            regions[region] = block
    finally:
        if isinstance(jar, MeteorInBackground):
            jar.wait()
            timings["meteor_jar_background"] = jar.elapsed_s
        if own and isinstance(meteor, MeteorScorer):
            meteor.close()

    t1 = time.perf_counter()
    impl = labeler.IMPLEMENTATION
    clinical: dict[str, Any] = {}
    block = clinical_scores(ref_lab, hyp_lab)
    block["implementation"] = f"{CA_F1_IMPLEMENTATION}; labels: {impl} on both sides"
    block.update(bootstrap.f1_intervals(ref_lab, hyp_lab, counts))
    clinical["labeler_vs_labeler"] = block
    label_cols = [c for c in CTRATE_CLASSES if c in joined.columns]
    if len(label_cols) == len(CTRATE_CLASSES):
        gold = joined[list(CTRATE_CLASSES)].fillna(0).to_numpy().astype(np.int64)
        block = clinical_scores(gold, hyp_lab)
        block["implementation"] = (
            f"{CA_F1_IMPLEMENTATION}; reference = label columns of the references, prediction = {impl}"
        )
        block.update(bootstrap.f1_intervals(gold, hyp_lab, counts))
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
    timings["bootstrap"] = t_boot + time.perf_counter() - t1
    for j, cls in enumerate(CTRATE_CLASSES):
        columns[f"reference label/{cls}"] = np.asarray(ref_lab)[:, j].astype(np.int8)
    for j, cls in enumerate(CTRATE_CLASSES):
        columns[f"prediction label/{cls}"] = np.asarray(hyp_lab)[:, j].astype(np.int8)

    metrics = {
        "experiment": experiment,
        "n_volumes": int(n),
        "n_references_without_prediction": pairs.report["n_references_without_prediction"],
        "inputs": pairs.report,
        "nlg": {"report": report_nlg, "regions": regions},
        "clinical": clinical,
        "green": green if green is not None else not_run("GREEN adapter not configured (evaluate.green is null)"),
        "judge": judge if judge is not None else not_run("LLM judge not configured (evaluate.judge is null)"),
        "meteor_jvm_starts": MeteorScorer.starts - starts_before,
        "uncertainty": bootstrap.description(n_resamples, seed),
        "bootstrap": {"n_resamples": n_resamples, "seed": seed},
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "implementations": {
            **NLG_IMPLEMENTATIONS,
            "CA-F1": CA_F1_IMPLEMENTATION,
            "labeler": impl,
            "normalisation": NORMALISATION,
        },
    }
    return metrics, pd.DataFrame(columns)


def evaluate(pred: pd.DataFrame | Pairs, ref: pd.DataFrame | None, experiment: str, **kw) -> dict:
    """The metrics.json dict of one experiment (:func:`score_experiment` without the per-volume scores)."""
    return score_experiment(pred, ref, experiment, **kw)[0]


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


def _pm(entry: dict) -> str:
    """"0.1234 +- 0.0567 [0.1100, 0.1300]": value, std over reports (when per report), 95 % bootstrap CI."""
    text = _val(entry)
    if entry.get("std") is not None:
        text += f" +- {entry['std']:.4f}"
    if entry.get("ci95"):
        text += f" [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"
    return text


def summary(metrics: dict) -> str:
    r = metrics["nlg"]["report"]
    ca = metrics["clinical"]["labeler_vs_labeler"]
    inp = metrics.get("inputs", {})
    lines = [f"[{metrics['experiment']}] {metrics['n_volumes']} volumes scored"]
    orphans = inp.get("predictions_without_reference", {}).get("count", 0)
    if orphans:
        lines.append(f"  {orphans} prediction(s) without a reference: reported, not scored")
    for key, entry in r.items():
        lines.append(f"  {key:26s} {_pm(entry):>38s}  [{entry['averaging']}]")
    for key in ("METEOR", "METEOR evaluate"):
        if r[key].get("status") == "not run":
            lines.append(f"  {key} not run: {r[key]['reason']}")
    ci = ca.get("macro_f1_ci95")
    lines.append(
        f"  CA-F1 (labeler vs labeler): macro {_fmt(ca['macro_f1'])}"
        + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
        + f"  micro {_fmt(ca['micro_f1'])}  weighted {_fmt(ca['weighted_f1'])}"
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


def add_scoring_options(ap: argparse.ArgumentParser) -> None:
    """The options shared by the experiment CLI and ``score``: Java, WordNet, bootstrap."""
    ap.add_argument("--java", default=None, help="Java executable for the METEOR jar (default $MEDREGION_JAVA/java)")
    ap.add_argument("--wordnet", type=Path, default=None,
                    help="folder with WordNet 3.0's database files for 'METEOR evaluate' (default: Debian's "
                         "wordnet-base folder, 'not run' when absent; a folder given here must exist)")
    ap.add_argument("--bootstrap-resamples", type=int, default=bootstrap.DEFAULT_RESAMPLES,
                    help="bootstrap resamples of the 95 %% CIs")
    ap.add_argument("--seed", type=int, default=bootstrap.DEFAULT_SEED, help="bootstrap seed")


def wordnet_from_args(args: argparse.Namespace):
    """The WordNet reader (or not-run reason) the options ask for; ValueError when --wordnet names a folder
    that cannot be read (the user asked for it: an error, not a silent 'not run')."""
    from pipeline.evaluate.nlg import WordNetNotRun

    wn = open_wordnet(args.wordnet)
    if args.wordnet is not None and isinstance(wn, WordNetNotRun):
        raise ValueError(f"--wordnet / evaluate.wordnet: {wn.reason}")
    if args.bootstrap_resamples < 1:
        raise ValueError(f"--bootstrap-resamples must be >= 1, got {args.bootstrap_resamples}")
    return wn


@dataclass(frozen=True)
class BootstrapSettings:
    """The config's `evaluate.bootstrap`: resamples and seed of the 95 % CIs and the paired tests."""

    resamples: int = bootstrap.DEFAULT_RESAMPLES
    seed: int = bootstrap.DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.resamples < 1:
            raise SettingsError(f"evaluate.bootstrap.resamples must be >= 1, got {self.resamples}")


@dataclass(frozen=True)
class LabelerSettings:
    """The config's `evaluate.labeler`: the CT-RATE labeler behind CA-F1 (radbert: local weights and folder)."""

    backend: str = "rules"
    weights: str | None = None
    model_dir: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise SettingsError(f"evaluate.labeler.backend {self.backend!r} is not one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class EvaluateSettings:
    """The evaluate stage's settings: the config's `evaluate` section less GREEN / the judge (their own
    jobs, whose JSON comes in as --green / --judge files) and the ablation table's `baseline`.

    `java`: Java for the METEOR jar (None: $MEDREGION_JAVA or java on PATH); `wordnet`: WordNet 3.0 folder
    for the Hugging Face-style METEOR (None: Debian's wordnet-base folder, 'not run' when absent).
    """

    java: str | None = None
    wordnet: str | None = None
    labeler: LabelerSettings = field(default_factory=LabelerSettings)
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["score"]:
        from pipeline.evaluate.score import main as score_main

        return score_main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__.split("\n\n")[0],
                                 epilog="python -m pipeline.evaluate score --help: score any CSV/Parquet of pairs")
    ap.add_argument("--predictions", required=True, type=Path, help=".parquet, .csv or .jsonl")
    ap.add_argument("--references", required=True, type=Path, help="reference reports (.parquet or .csv)")
    ap.add_argument("--experiment", required=True, help="experiment name recorded in metrics.json")
    ap.add_argument("--out", required=True, type=Path, help="metrics.json to write")
    ap.add_argument("--params-json", default="{}",
                    help="EvaluateSettings as JSON (the `evaluate` section's java, wordnet, labeler, bootstrap), "
                         'e.g. \'{"java": "/usr/bin/java", "bootstrap": {"resamples": 1000, "seed": 0}}\'')
    ap.add_argument("--green", type=Path, nargs="?", default=None,
                    help="green.json from python -m pipeline.evaluate.green (absent or empty: GREEN not run)")
    ap.add_argument("--judge", type=Path, nargs="?", default=None,
                    help="judge.json from python -m pipeline.evaluate.judge (absent or empty: judge not run)")
    ap.add_argument("--scores-out", type=Path, default=None, help="scores.parquet: one row per volume")
    ap.add_argument("--skipped-qc", nargs="*", default=[], type=Path,
                    help="QC tables of the data stages: their skipped volumes are counted in metrics.json")
    args = ap.parse_args(argv)
    t0 = time.time()
    try:
        settings = parse_settings(EvaluateSettings, args.params_json, section="evaluate")
        lab, boot = settings.labeler, settings.bootstrap
        pairs = load_pairs(args.predictions, args.references)
        labeler = load_labeler(lab.backend, lab.weights, lab.model_dir, lab.device)
        wordnet = wordnet_from_args(argparse.Namespace(wordnet=None if settings.wordnet is None else Path(settings.wordnet),
                                                       bootstrap_resamples=boot.resamples))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    green = load_adapter_result(args.green, "GREEN", "green", boot.resamples, boot.seed)
    judge = load_adapter_result(args.judge, "LLM judge", "judge", boot.resamples, boot.seed)
    metrics, scores = score_experiment(pairs, None, args.experiment, labeler=labeler, java=settings.java, green=green,
                                       judge=judge, wordnet=wordnet, n_resamples=boot.resamples, seed=boot.seed)
    metrics.update(outcome_blocks(args.predictions, args.references, args.skipped_qc))
    timings = metrics.pop("timings_s", {})  # run-time measurements: the log, not the results file
    if args.scores_out:
        write_parquet(scores, args.scores_out)
    write_json_atomic(metrics, args.out)
    print(summary(metrics))
    print(f"  timings (s): {json.dumps(timings)}")
    print(f"  wrote {args.out} ({time.time() - t0:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
