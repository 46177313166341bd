"""Uncertainty of the scores: mean +- std over volumes, bootstrap CIs, paired bootstrap between experiments.

No CT report paper we compare with prints an interval; these are ours. Definitions:

* **Resamples**: ``n_resamples`` (default 1,000) draws of the n volumes *with replacement*, from
  ``numpy.random.default_rng(seed)`` (default seed 0), as a (resamples, n) matrix of multiplicities, so
  every metric of one evaluation sees the same resampled volume sets, and two runs with the same seed give
  the same numbers.
* **Per-report metrics** (``report-mean``): ``std`` is the sample standard deviation (ddof 1) of the
  per-report scores, the "mean +- std" papers print; the 95 % CI is the 2.5th-97.5th percentile of the
  resampled means (percentile bootstrap). A region's pairs are the volumes where the region is not empty
  on both sides: its resampled mean is over the resampled volumes that have a pair. CIDEr-D's per-report
  scores keep the document frequencies of the whole set (not recomputed per resample).
* **Corpus metrics**: pycocoevalcap's corpus BLEU is rebuilt for every resample from the per-pair n-gram
  statistics (:func:`pipeline.evaluate.nlg.corpus_bleu_from_stats`); ``std`` is null (there is no per-report
  value). The METEOR jar's corpus aggregate gets no interval (only the jar can aggregate its statistics;
  ``METEOR report-mean`` has one).
* **CA-F1** is resampled as a whole: per resample, the per-class tp / fp / fn are recounted over the drawn
  volumes and macro / micro / weighted F1 recomputed (classes without reference support in the resample
  are left out of the macro, as in :mod:`pipeline.evaluate.clinical`); never per class separately.
* **Paired bootstrap** (experiment B against A on the volumes both scored): the same multiplicities are
  applied to both; the difference is stat(B) - stat(A); CI = percentiles of the resampled differences;
  two-sided p = min(1, 2 min((#{d* <= 0} + 1) / (R + 1), (#{d* >= 0} + 1) / (R + 1))), so identical
  experiments give p = 1 and a difference no resample crosses gives p = 2 / (R + 1) (0.002 at R = 1,000).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


def description(n_resamples: int, seed: int) -> str:
    return (
        f"percentile bootstrap over volumes: {n_resamples} resamples with replacement, numpy default_rng seed "
        f"{seed}, 95 % interval = 2.5th-97.5th percentile; std = sample std (ddof 1) of per-report scores; "
        "CA-F1 recomputed from resampled label counts; paired bootstrap p two-sided with +1 correction"
    )


def multiplicities(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(n_resamples, n) float64 matrix: how often each of n volumes is drawn in each resample."""
    if n < 1:
        raise ValueError("bootstrap needs at least one volume")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    counts = np.zeros((n_resamples, n), dtype=np.float64)
    rows = np.repeat(np.arange(n_resamples), n)
    np.add.at(counts, (rows, idx.ravel()), 1.0)
    return counts


def interval(samples: np.ndarray) -> list[float] | None:
    """The central 95 % percentile interval of finite bootstrap samples (None when there are none)."""
    samples = np.asarray(samples, dtype=np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [100 * (1 - LEVEL) / 2, 100 * (1 + LEVEL) / 2])
    return [float(lo), float(hi)]


def resampled_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Mean of ``values`` (NaN = volume without a pair) over each resample's drawn volumes."""
    values = np.asarray(values, dtype=np.float64)
    present = np.isfinite(values).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ np.nan_to_num(values)) / (counts @ present)


def mean_block(values, counts: np.ndarray) -> dict:
    """{"mean", "std", "ci95", "n"} of per-volume ``values`` (NaN where the volume has no pair)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"mean": None, "std": None, "ci95": None, "n": 0}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std(ddof=1)) if finite.size > 1 else None,
        "ci95": interval(resampled_means(v, counts)),
        "n": int(finite.size),
    }


# ---------------------------------------------------------------------------------------------- CA-F1
def _label_counts(ref: np.ndarray, hyp: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tp, fp, fn) per class, each (resamples, classes), of 0/1 label matrices (volumes, classes)."""
    ref = np.asarray(ref) > 0
    hyp = np.asarray(hyp) > 0
    tp = weights @ (ref & hyp).astype(np.float64)
    fp = weights @ (~ref & hyp).astype(np.float64)
    fn = weights @ (ref & ~hyp).astype(np.float64)
    return tp, fp, fn


def f1_from_labels(ref: np.ndarray, hyp: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """{"macro_f1", "micro_f1", "weighted_f1"}: one value per row of ``weights`` (volume multiplicities),
    with the definitions of :func:`pipeline.evaluate.clinical.clinical_scores` (NaN where undefined)."""
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    tp, fp, fn = _label_counts(ref, hyp, weights)
    support = tp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(support > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
        has = support > 0
        macro = np.where(has.any(axis=1), np.nansum(f1, axis=1) / has.sum(axis=1), np.nan)
        TP, FP, FN = tp.sum(axis=1), fp.sum(axis=1), fn.sum(axis=1)
        micro = np.where(2 * TP + FP + FN > 0, 2 * TP / (2 * TP + FP + FN), np.nan)
        weighted = np.where(support.sum(axis=1) > 0, np.nansum(f1 * support, axis=1) / support.sum(axis=1), np.nan)
    return {"macro_f1": macro, "micro_f1": micro, "weighted_f1": weighted}


def f1_intervals(ref: np.ndarray, hyp: np.ndarray, counts: np.ndarray) -> dict[str, list[float] | None]:
    """95 % CIs of macro / micro / weighted F1, CA-F1 resampled as a whole."""
    return {f"{k}_ci95": interval(v) for k, v in f1_from_labels(ref, hyp, counts).items()}


# ---------------------------------------------------------------------------------------------- paired
def paired_difference(stat_a: Callable[[np.ndarray], np.ndarray], stat_b: Callable[[np.ndarray], np.ndarray],
                      n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED) -> dict:
    """Paired bootstrap of stat(B) - stat(A) over n volumes both experiments scored (same order).

    ``stat_x(weights)`` maps a (rows, n) multiplicity matrix to one statistic per row; the point estimate
    uses all-ones weights. Returns {"difference", "ci95", "p_value", "n_volumes", "n_resamples"}.
    """
    ones = np.ones((1, n))
    diff = float(stat_b(ones)[0] - stat_a(ones)[0])
    counts = multiplicities(n, n_resamples, seed)
    d = stat_b(counts) - stat_a(counts)
    d = d[np.isfinite(d)]
    if d.size == 0 or not np.isfinite(diff):
        return {"difference": None, "ci95": None, "p_value": None, "n_volumes": n, "n_resamples": n_resamples}
    # exact zeros count on both sides: identical experiments give p = 1
    le = (np.count_nonzero(d <= 0) + 1) / (d.size + 1)
    ge = (np.count_nonzero(d >= 0) + 1) / (d.size + 1)
    return {
        "difference": diff,
        "ci95": interval(d),
        "p_value": float(min(1.0, 2 * min(le, ge))),
        "n_volumes": n,
        "n_resamples": n_resamples,
    }


def mean_stat(values) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic "mean of ``values`` over the drawn volumes" for :func:`paired_difference`."""
    v = np.asarray(values, dtype=np.float64)
    return lambda w: resampled_means(v, w)


def macro_f1_stat(ref, hyp) -> Callable[[np.ndarray], np.ndarray]:
    """The statistic "macro CA-F1 of the drawn volumes" for :func:`paired_difference`."""
    return lambda w: f1_from_labels(ref, hyp, w)["macro_f1"]
