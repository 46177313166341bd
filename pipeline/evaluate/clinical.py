"""Clinical-accuracy scores (CA-F1) from 0/1 label matrices.

Per class: tp, fp, fn, support (= tp + fn, positives in the reference), predicted (= tp + fp),
precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn).

Undefined values are reported as ``None`` (JSON ``null``), never silently as 0:
  * precision is undefined when the class is never predicted (tp + fp = 0);
  * recall and F1 are undefined when the class has zero support in the reference (tp + fn = 0). F1 is
    then left out of the macro average; ``excluded_from_macro`` names such classes and ``note`` says so.
A class with support but no prediction has recall 0 and F1 0 (it is counted in the macro).

Averages:
  * ``macro_f1``     - unweighted mean of F1 over classes with support > 0 (the paper's "averaged across
                       18" when all 18 have support);
  * ``micro_f1``     - F1 of the pooled tp / fp / fn of all classes (zero-support classes' false
                       positives count here);
  * ``weighted_f1``  - support-weighted mean of per-class F1;
  * ``macro_precision`` / ``macro_recall`` - means over the classes where each is defined.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.constants import CTRATE_CLASSES


def _div(a: float, b: float) -> float | None:
    return float(a) / float(b) if b else None


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def clinical_scores(ref_labels, hyp_labels, classes: Sequence[str] = CTRATE_CLASSES) -> dict:
    """Per-class and averaged precision / recall / F1 of ``hyp_labels`` against ``ref_labels``.

    Both are (n, C) arrays (or nested lists) of 0/1 with columns in ``classes`` order.
    """
    ref = np.asarray(ref_labels).astype(np.int64)
    hyp = np.asarray(hyp_labels).astype(np.int64)
    if ref.ndim != 2 or ref.shape != hyp.shape:
        raise ValueError(f"label arrays must be (n, C) of equal shape, got {ref.shape} and {hyp.shape}")
    if ref.shape[1] != len(classes):
        raise ValueError(f"{ref.shape[1]} label columns but {len(classes)} class names")
    if ((ref != 0) & (ref != 1)).any() or ((hyp != 0) & (hyp != 1)).any():
        raise ValueError("labels must be 0/1")

    per_class: dict[str, dict] = {}
    f1s, supports, precs, recs, excluded = [], [], [], [], []
    TP = FP = FN = 0
    for k, name in enumerate(classes):
        r, h = ref[:, k], hyp[:, k]
        tp = int(((r == 1) & (h == 1)).sum())
        fp = int(((r == 0) & (h == 1)).sum())
        fn = int(((r == 1) & (h == 0)).sum())
        support = tp + fn
        precision = _div(tp, tp + fp)
        recall = _div(tp, support)
        f1 = _div(2 * tp, 2 * tp + fp + fn) if support > 0 else None
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": tp + fp,
            "tp": tp,
            "fp": fp,
            "fn": fn,
        }
        TP, FP, FN = TP + tp, FP + fp, FN + fn
        if f1 is None:
            excluded.append(name)
        else:
            f1s.append(f1)
            supports.append(support)
        if precision is not None:
            precs.append(precision)
        if recall is not None:
            recs.append(recall)

    total_support = int(sum(supports))
    weighted = (
        float(np.dot(f1s, supports) / total_support) if total_support else None
    )
    note = (
        "F1 is undefined (null) for classes with zero reference support; they are excluded from macro_f1 "
        "and weighted_f1 (their false positives still count in micro_f1). Precision is null for classes "
        "never predicted; macro_precision/macro_recall average only defined values."
    )
    return {
        "n_samples": int(ref.shape[0]),
        "n_classes": len(classes),
        "per_class": per_class,
        "macro_f1": _mean(f1s),
        "micro_f1": _div(2 * TP, 2 * TP + FP + FN),
        "weighted_f1": weighted,
        "macro_precision": _mean(precs),
        "macro_recall": _mean(recs),
        "n_classes_in_macro": len(f1s),
        "excluded_from_macro": excluded,
        "note": note,
    }
