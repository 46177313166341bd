"""Does the demo model learn? CA-F1 of the full model on the demo test split vs a most-common-report baseline.

    python benchmarks/demo_learning.py                      # runs the demo workflow (default config) in a
                                                            # temporary folder, then scores it
    python benchmarks/demo_learning.py --results results    # scores an existing demo run
    python benchmarks/demo_learning.py --configfile extra.yaml --keep DIR   # another demo config

CA-F1 here = macro F1 over the CT-RATE classes the demo cohort can plant (pipeline.demo.findings) that
have support in the test split, the same 18-class labeler (pipeline.evaluate.labeler) run on the
reference findings and on the generated report (what the evaluate stage reports as
`labeler_vs_labeler`). Baseline: every test volume gets the most common training report; all demo
reports are worded differently, so "most common" is taken over the labeler's finding vector (the most
common vector of the training reports: the normal one), and the first training report with that vector
is written. Also checked: generated reports differ between test volumes whose findings differ.

Claim (exit status 1 when it fails): CA-F1 >= 0.6, at least 0.3 above the baseline, and >= 90 % of
the test-volume pairs with different reference findings get different generated reports.

`--probe` adds what the cache can carry at all: per planted class, the cross-validated F1 of a ridge
classifier (4 folds over all volumes, features z-scored on the training folds, best of three
regularisation strengths) on each cached array of the volume (global, region, mask_pooled, mask_grid)
and on the labels' "always positive" (chance) F1. A class whose probe F1 stays near chance cannot be
learned from these features by any model of this size of data.

`--ceiling` asks whether the target is within reach of the model's inputs at this cohort size: per
planted class with test support, a ridge classifier or a one-input threshold is fitted on the training
split (cached arrays, the attribute numbers, or all), the input and learner chosen by cross-validation
on the training split only, and scored on the test split as CA-F1 is (macro over the same classes).
Below 0.6, a model trained on these volumes would have to beat simple learners on the same inputs by a
wide margin to reach the claim; the hindsight figure (best test F1 over all inputs and learners) is an
optimistic reference, not a fair estimate.

`--inputs GROUP` (repeatable, with `--ceiling` and/or `--probe`) restricts them to one group of prompt
inputs at a time, as the network sees them: `image` (the R2 cache's global and region arrays: the vision
tokens of the r2 experiments), `image_lita` (the same from the LITA cache: uniform slices), `mask` (the
mask-pooled and mask-grid arrays: the mask and spatial tokens) or `attributes` (the numbers the attribute
text states). Which part carries a class is then read off per group (`ceiling_by_inputs`): a class that
only one group reaches is carried by that prompt part alone.

`--train-fit` scores the model on its own training volumes the same way (generated here): a low value
means the model underfits the demo, so more data alone would not help.

`--errors` shows where the model fails: per planted class, the prompt number that best separates it on
the training volumes (AUC) and, on the test split, the positives found and missed, the false
positives, and what the model wrote instead for the misses.

`--slot-control FINDING:MASK` asks whether the LM can read one mask slot at all: the finding's positive
volumes get an unmistakable mark (+2 training-set SDs in 5 dims of that mask's pooled features; for
cardiomegaly in the heart token of the 5-finding demo the sum of the marked dims alone separates the
classes, AUC 1.0), the model is retrained on the marked cache with the experiment's
parameters (plus feature_norm, so the mark is 2 units in what the extractor sees), and the finding's
F1 on generated reports is measured on the training and test splits.

`--reliance` asks whether the trained model uses the features at all: the median relative increase of
the teacher-forced loss of training volumes with findings when their image features are swapped for a
normal volume's (near 0: the model writes from the prompt text and its language prior alone).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.constants import CTRATE_CLASSES  # noqa: E402
from pipeline.demo.findings import FINDING_WEIGHTS  # noqa: E402
from pipeline.evaluate.clinical import clinical_scores  # noqa: E402
from pipeline.evaluate.labeler import label_reports  # noqa: E402

PLANTED = tuple(c for c in CTRATE_CLASSES if c in FINDING_WEIGHTS)
MIN_F1, MIN_GAIN, MIN_DIFFER = 0.6, 0.3, 0.9


def macro_over(scores: dict, classes) -> tuple[float | None, list[str]]:
    used = [c for c in classes if scores["per_class"][c]["f1"] is not None]
    return (float(np.mean([scores["per_class"][c]["f1"] for c in used])) if used else None), used


def score(results: Path, experiment: str = "full") -> dict:
    pred = pd.read_parquet(results / "experiments" / experiment / "predictions.parquet")
    test = pd.read_parquet(results / "reports" / "test.parquet").set_index("volume_id")
    train = pd.read_parquet(results / "reports" / "train.parquet")
    test = test.loc[pred["volume_id"]]
    ref = label_reports(test["findings"].tolist())
    hyp = label_reports(pred["report"].fillna("").tolist())

    train_labels = label_reports(train["findings"].tolist())
    common = Counter(map(tuple, train_labels)).most_common(1)[0][0]
    first = int(np.flatnonzero((train_labels == np.array(common)).all(axis=1))[0])
    base_text = train["findings"].iloc[first]
    base = label_reports([base_text] * len(test))

    model_scores, base_scores = clinical_scores(ref, hyp), clinical_scores(ref, base)
    f1, used = macro_over(model_scores, PLANTED)
    bf1, _ = macro_over(base_scores, PLANTED)

    pairs = [(i, j) for i, j in combinations(range(len(test)), 2) if (ref[i] != ref[j]).any()]
    reports = pred["report"].fillna("").tolist()
    differ = sum(reports[i] != reports[j] for i, j in pairs) / max(1, len(pairs))
    result = {
        "results": str(results),
        "test_volumes": len(test),
        "classes_scored": used,
        "ca_f1_macro_planted": f1,
        "baseline_ca_f1_macro_planted": bf1,
        "gain": None if f1 is None or bf1 is None else f1 - bf1,
        "ca_f1_macro_18_with_support": model_scores["macro_f1"],
        "ca_f1_micro": model_scores["micro_f1"],
        "per_class": {
            c: {k: model_scores["per_class"][c][k] for k in ("f1", "support", "predicted", "tp")} for c in used
        },
        "baseline_report": base_text,
        "distinct_generated_reports": len(set(reports)),
        "pairs_with_different_findings": len(pairs),
        "share_of_those_pairs_with_different_reports": differ,
    }
    result["claim_met"] = bool(
        f1 is not None and f1 >= MIN_F1 and result["gain"] >= MIN_GAIN and differ >= MIN_DIFFER
    )
    return result


def model_inputs(results: Path, pooling: str = "r2") -> tuple[list[str], list[str]]:
    """(feature shards of `pooling`, attribute tables) of a results folder, as the train rule lists them."""
    feats = sorted(str(p) for p in (results / "features").glob(f"*-{pooling}/shard-*.zarr"))
    return feats, sorted(str(p) for p in (results / "attributes").glob("shard-*.parquet"))


def _ridge_predict(a_tr: np.ndarray, y_tr: np.ndarray, a_te: np.ndarray, lam: float) -> np.ndarray:
    """Kernel ridge on +-1 targets over standardised inputs (n << dims here); True where > 0."""
    mu, sd = a_tr.mean(0), a_tr.std(0) + 1e-6
    at, ae = (a_tr - mu) / sd, (a_te - mu) / sd
    alpha = np.linalg.solve(at @ at.T + lam * np.eye(len(at)), 2.0 * y_tr - 1.0)
    return (ae @ at.T @ alpha) > 0


def _f1(pred: np.ndarray, y: np.ndarray) -> float:
    tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
    return float(2 * tp / max(1, 2 * tp + fp + fn))


def _stump_predict(a_tr: np.ndarray, y_tr: np.ndarray, a_te: np.ndarray) -> np.ndarray:
    """The single input and threshold (either direction) with the best training F1: the learner for a
    finding that one number carries (heart volume, lesion count), which ridge over thousands of dims
    blurs."""
    n, p = a_tr.shape[0], max(1, int(y_tr.sum()))
    best = (-1.0, 0, 0.0, 1.0)  # f1, column, threshold, sign
    for sign in (1.0, -1.0):
        v = sign * a_tr
        order = np.argsort(-v, axis=0, kind="stable")
        tp = np.cumsum(y_tr[order], axis=0)  # tp when the top-k values are called positive
        k = np.arange(1, n + 1)[:, None]
        f1 = 2 * tp / (k + p)
        vs = np.take_along_axis(v, order, axis=0)
        f1[:-1][vs[:-1] == vs[1:]] = -1.0  # no threshold between equal values
        i, j = np.unravel_index(int(np.argmax(f1)), f1.shape)
        if f1[i, j] > best[0]:
            nxt = vs[i + 1, j] if i + 1 < n else vs[i, j] - 1.0
            best = (float(f1[i, j]), int(j), float((vs[i, j] + nxt) / 2), sign)
    _, j, t, sign = best
    return sign * a_te[:, j] > t


LAMBDAS = (1.0, 30.0, 1000.0)
LEARNERS = (*(f"ridge {lam:g}" for lam in LAMBDAS), "stump")


def _predict(learner: str, a_tr: np.ndarray, y_tr: np.ndarray, a_te: np.ndarray) -> np.ndarray:
    if learner == "stump":
        return _stump_predict(a_tr, y_tr, a_te)
    return _ridge_predict(a_tr, y_tr, a_te, float(learner.split()[1]))


def _cv_f1(a: np.ndarray, y: np.ndarray, learner: str, folds: list[np.ndarray]) -> float:
    pred = np.zeros(len(y), bool)
    for te in folds:
        tr = np.setdiff1d(np.arange(len(y)), te)
        pred[te] = _predict(learner, a[tr], y[tr], a[te])
    return _f1(pred, y)


def _feature_store(results: Path, pooling: str = "r2"):
    from pipeline.feature_store import FeatureStore

    shards = model_inputs(results, pooling)[0]
    if not shards:
        sys.exit(f"{results}: no features/*-{pooling}/shard-*.zarr (run the demo through its features stage "
                 f"first{'; a lita cache is built when an experiment uses lita pooling' if pooling == 'lita' else ''})")
    return FeatureStore(shards)


def _feature_groups(store, volume_ids: list[str]) -> dict[str, np.ndarray]:
    """Each cached array of the volumes, flattened: what the network's vision and mask tokens come from."""
    feats: dict[str, list] = {k: [] for k in ("global", "region", "mask_pooled", "mask_grid")}
    for v in volume_ids:
        f = store[v]
        for k in feats:
            feats[k].append(np.asarray(f[k], np.float32).ravel())
    return {k: np.stack(v) for k, v in feats.items()}


# `--inputs`: the prompt parts, each as the cached arrays (or attribute numbers) it is made from
INPUT_GROUPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "image": ("r2", ("global", "region")),
    "image_lita": ("lita", ("global", "region")),
    "mask": ("r2", ("mask_pooled", "mask_grid")),
    "attributes": ("", ("attributes",)),
}


def input_groups(results: Path, volume_ids: list[str], inputs: str | None = None) -> dict[str, np.ndarray]:
    """The ceiling's / probe's inputs, one row per volume: without `inputs` every cached r2 array and the
    attribute numbers; with `inputs` (a key of INPUT_GROUPS) only that prompt part's arrays, each alone
    and, where there are several, side by side (`<inputs> (all)`)."""
    if inputs is None:
        groups = _feature_groups(_feature_store(results), volume_ids)
        groups["attributes"] = _attribute_numbers(results, volume_ids)
        return groups
    if inputs not in INPUT_GROUPS:
        sys.exit(f"--inputs: {inputs!r} is not one of {list(INPUT_GROUPS)}")
    pooling, arrays = INPUT_GROUPS[inputs]
    if arrays == ("attributes",):
        return {"attributes": _attribute_numbers(results, volume_ids)}
    feats = _feature_groups(_feature_store(results, pooling), volume_ids)
    groups = {f"{k} ({pooling})": feats[k] for k in arrays}
    groups[f"{inputs} (all)"] = np.hstack([feats[k] for k in arrays])
    return groups


def _attribute_frame(results: Path, volume_ids: list[str]) -> pd.DataFrame:
    """The numbers of the attribute prompt, one named column each: organ volumes, lesion counts,
    largest lesion diameter (`largest_<lesion>_mm`, 0 without one), in the order of the volume ids."""
    tables = model_inputs(results)[1]
    if not tables:
        sys.exit(f"{results}: no attributes/shard-*.parquet (run the demo through its attributes stage first)")
    attrs = pd.concat(pd.read_parquet(p) for p in tables).set_index("volume_id")
    missing = sorted(set(volume_ids) - set(attrs.index.astype(str)))
    if missing:
        sys.exit(f"{results}: {len(missing)} volumes have no attribute row, e.g. {missing[:3]}")
    attrs = attrs.loc[volume_ids]
    cols = [c for c in attrs.columns if c.endswith(("_ml", "_count"))]
    largest = {f"largest_{c.removesuffix('_diameters_mm')}_mm": attrs[c].map(lambda d: float(np.max(d)) if len(d) else 0.0)
               for c in attrs.columns if c.endswith("_diameters_mm")}
    return pd.DataFrame({**{c: attrs[c] for c in cols}, **largest}).astype(np.float64)


def _attribute_numbers(results: Path, volume_ids: list[str]) -> np.ndarray:
    """`_attribute_frame` as an array (the `--ceiling` / `--slot-control` inputs)."""
    return _attribute_frame(results, volume_ids).to_numpy(np.float32)


def _auc(x: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve of score x for labels y (ties count half)."""
    pos, neg = x[y == 1], x[y == 0]
    return float(((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (len(pos) * len(neg)))


def errors(results: Path, experiment: str = "full") -> dict:
    """Per planted class, what the prompt's numbers say and what the model wrote on the test split.

    Evidence: the single attribute number (an organ volume, the lung lobes' or heart chambers' sum as
    the prompt groups them, a lesion count, a largest diameter) that best separates the class on the
    training volumes (AUC, either direction; 1.0: one threshold on a number the prompt states decides
    it). Then on the test split: positives, found, missed, false positives, and for the misses the
    other planted classes the model wrote that the reference lacks (e.g. a pleural effusion written as a
    pericardial one)."""
    from pipeline.constants import HEART_CHAMBERS, LOBES

    pred = pd.read_parquet(results / "experiments" / experiment / "predictions.parquet")
    train = pd.read_parquet(results / "reports" / "train.parquet")
    test = pd.read_parquet(results / "reports" / "test.parquet").set_index("volume_id").loc[pred["volume_id"]]
    numbers = _attribute_frame(results, train["volume_id"].astype(str).tolist())
    numbers["lung_lobes_ml (sum)"] = numbers[[f"{s}_ml" for s in LOBES]].sum(axis=1)
    numbers["heart_chambers_ml (sum)"] = numbers[[f"{s}_ml" for s in HEART_CHAMBERS]].sum(axis=1)
    y_train = label_reports(train["findings"].tolist())
    ref, hyp = label_reports(test["findings"].tolist()), label_reports(pred["report"].fillna("").tolist())
    idx = {c: CTRATE_CLASSES.index(c) for c in PLANTED}
    out = {}
    for c, i in idx.items():
        y = y_train[:, i]
        if y.sum() == 0 or y.sum() == len(y) or ref[:, i].sum() == 0:
            continue
        aucs = {k: _auc(numbers[k].to_numpy(), y) for k in numbers.columns}
        best = max(aucs, key=lambda k: max(aucs[k], 1 - aucs[k]))
        missed = (ref[:, i] == 1) & (hyp[:, i] == 0)
        instead = Counter(o for o, j in idx.items() if o != c
                          for k in np.flatnonzero(missed) if hyp[k, j] == 1 and ref[k, j] == 0)
        out[c] = {"best_attribute": best, "auc_train": round(max(aucs[best], 1 - aucs[best]), 3),
                  "test_positives": int(ref[:, i].sum()), "found": int(((ref[:, i] == 1) & (hyp[:, i] == 1)).sum()),
                  "missed": int(missed.sum()), "false_positives": int(((ref[:, i] == 0) & (hyp[:, i] == 1)).sum()),
                  "missed_written_as": dict(instead.most_common())}
    return {"train_volumes": len(train), "test_volumes": len(test), "per_class": out}


def probe(results: Path, inputs: str | None = None) -> dict:
    """Cross-validated ridge F1 per planted class on each cached array (or, with `inputs`, on that
    prompt part's arrays; see `input_groups`)."""
    store = _feature_store(results, "lita" if inputs == "image_lita" else "r2")
    reps = pd.concat(pd.read_parquet(results / "reports" / f"{s}.parquet") for s in ("train", "validation", "test"))
    reps = reps[reps["volume_id"].isin(set(store.volume_ids))]
    y_all = label_reports(reps["findings"].tolist())
    ids = reps["volume_id"].astype(str).tolist()
    x = _feature_groups(store, ids) if inputs is None else input_groups(results, ids, inputs)
    rng = np.random.default_rng(0)
    n = len(reps)
    folds = np.array_split(rng.permutation(n), 4)
    out = {}
    for c in PLANTED:
        y = y_all[:, CTRATE_CLASSES.index(c)]
        if y.sum() < 4:
            continue
        prev = y.mean()
        out[c] = {"positives": int(y.sum()), "chance_f1": round(float(2 * prev / (1 + prev)), 3),
                  **{k: round(max(_cv_f1(a, y, f"ridge {lam:g}", folds) for lam in LAMBDAS), 3)
                     for k, a in x.items()}}
    return {"volumes": n, "inputs": inputs or "every cached array", "per_class": out}


def ceiling(results: Path, inputs: str | None = None) -> dict:
    """What the model's inputs let a simple classifier reach on the test split, per planted class.

    For each class a kernel-ridge classifier (3 strengths) or a one-input threshold is fitted on the
    training split's inputs (each cached array, the attribute numbers, or all of them); the input group
    and learner are chosen by 4-fold cross-validation on the training split alone. The chosen
    predictions are scored on the test split by the evaluate stage's `clinical_scores`, macro over the
    planted classes with test support, as the model is. Also given: the best test F1 over every group
    and learner (chosen with hindsight, an optimistic reference). With `inputs` only that prompt part's
    arrays are offered (`input_groups`): what the part alone carries.
    """
    train = pd.read_parquet(results / "reports" / "train.parquet")
    test = pd.read_parquet(results / "reports" / "test.parquet")
    ids_tr, ids_te = train["volume_id"].astype(str).tolist(), test["volume_id"].astype(str).tolist()
    y_tr_all, y_te_all = label_reports(train["findings"].tolist()), label_reports(test["findings"].tolist())
    # every input read once for both splits, then split by row
    groups = input_groups(results, ids_tr + ids_te, inputs)
    if inputs is None:
        groups["all"] = np.hstack(list(groups.values()))
    n_tr = len(ids_tr)
    folds = np.array_split(np.random.default_rng(0).permutation(n_tr), 4)
    chosen_pred = np.zeros_like(y_te_all)  # classes without a learner (too few positives) predict none
    details: dict[str, dict] = {}
    for c in PLANTED:
        k = CTRATE_CLASSES.index(c)
        y_tr, y_te = y_tr_all[:, k], y_te_all[:, k]
        details[c] = {"train_positives": int(y_tr.sum()), "f1_hindsight": 0.0, "chosen": None}
        if y_te.sum() == 0 or y_tr.sum() < 2:
            continue
        cv = {(g, m): _cv_f1(a[:n_tr], y_tr, m, folds) for g, a in groups.items() for m in LEARNERS}
        test_pred = {(g, m): _predict(m, groups[g][:n_tr], y_tr, groups[g][n_tr:]) for g, m in cv}
        chosen = max(cv, key=cv.get)
        chosen_pred[:, k] = test_pred[chosen]
        details[c].update(f1_hindsight=round(max(_f1(p, y_te) for p in test_pred.values()), 3),
                          chosen=f"{chosen[1]} on {chosen[0]}", cv_f1=round(cv[chosen], 3))
    scores = clinical_scores(y_te_all, chosen_pred)
    macro, used = macro_over(scores, PLANTED)
    per_class = {c: {"test_support": scores["per_class"][c]["support"],
                     "f1_cv_chosen": round(scores["per_class"][c]["f1"], 3), **details[c]} for c in used}
    return {"train_volumes": n_tr, "test_volumes": len(ids_te), "inputs": inputs or "all", "classes_scored": used,
            "macro_f1_cv_chosen": None if macro is None else round(macro, 3),
            "macro_f1_hindsight": round(float(np.mean([v["f1_hindsight"] for v in per_class.values()])), 3)
            if per_class else None,
            "per_class": per_class}


def reliance(results: Path, experiment: str = "full") -> dict:
    """How much the trained model uses the image features: teacher-forced loss of each training volume
    with a planted finding, on its own report, with its own features and with those of a normal
    training volume (vision, mask-pooled and mask-grid arrays swapped; prompt text kept). A model that
    reads the features finds its own report much less likely with someone else's features."""
    import torch

    from model.data import Collator, build_dataset
    from model.network import MedRegionCT

    model = MedRegionCT.from_pretrained(results / "experiments" / experiment / "stage2", device="cpu")
    model.eval()
    cfg = model.config
    feats, attrs = model_inputs(results, "lita" if cfg.pooling == "lita" else "r2")
    ds = build_dataset(feats, attrs, results / "reports" / "train.parquet", model.tokenizer, stage=2,
                       use_mask_tokens=cfg.prompt_uses_masks, use_attributes=cfg.prompt_uses_attributes,
                       n_vision=cfg.n_vision, max_length=cfg.max_length)
    train = pd.read_parquet(results / "reports" / "train.parquet").set_index("volume_id")
    labels = label_reports(train.loc[ds.volume_ids, "findings"].tolist())
    planted = [CTRATE_CLASSES.index(c) for c in PLANTED]
    abnormal = [i for i in range(len(ds)) if labels[i, planted].any()]
    normal = [i for i in range(len(ds)) if not labels[i].any()]
    collate = Collator(model.tokenizer.pad_token_id)

    def loss(item: dict) -> float:
        batch = collate([item])
        with torch.no_grad():
            return float(model(**{k: v for k, v in batch.items() if k != "volume_ids"}).loss)

    rel = []
    for i in abnormal:
        own = loss(ds[i])
        other = dict(ds[i])
        donor = ds[normal[i % len(normal)]]
        for k in ("vision", "mask_pooled", "mask_grid"):
            if k in other:
                other[k] = donor[k]
        rel.append(loss(other) / own - 1.0)
    return {"volumes_with_findings": len(abnormal), "normal_donors": len(normal),
            "median_loss_increase_with_other_features": round(float(np.median(rel)), 4),
            "max_loss_increase_with_other_features": round(float(np.max(rel)), 4)}


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        sys.exit(f"{what} failed:\n{proc.stderr[-3000:]}")


def _generated_scores(model_dir: Path, feats: list[str], attrs: list[str], reports: Path) -> tuple[dict, pd.DataFrame]:
    """Generate reports for the volumes of `reports` with `model.generate` (as the generate rule does)
    and score them against their reference findings: (clinical_scores, predictions)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "predictions.parquet"
        _run([sys.executable, "-m", "model.generate", "--model", str(model_dir), "--features", *feats,
              "--attributes", *attrs, "--reports", str(reports), "--out", str(out),
              "--params-json", '{"max_new_tokens": 200, "batch_size": 8}'], f"generation for {reports.name}")
        pred = pd.read_parquet(out)
    ref = pd.read_parquet(reports).set_index("volume_id").loc[pred["volume_id"]]
    scores = clinical_scores(label_reports(ref["findings"].tolist()), label_reports(pred["report"].fillna("").tolist()))
    return scores, pred


def train_fit(results: Path, experiment: str = "full") -> dict:
    """CA-F1 of the trained model on its own training volumes (reports generated here, as the generate
    rule does for the test split): low means the model underfits, not that it fails to generalise."""
    model_dir = results / "experiments" / experiment / "stage2"
    pooling = json.loads((model_dir / "medregion_config.json").read_text(encoding="utf-8"))["pooling"]
    feats, attrs = model_inputs(results, "lita" if pooling == "lita" else "r2")
    scores, pred = _generated_scores(model_dir, feats, attrs, results / "reports" / "train.parquet")
    f1, used = macro_over(scores, PLANTED)
    return {"train_volumes": len(pred), "ca_f1_macro_planted": f1, "classes_scored": used,
            "per_class": {c: {k: scores["per_class"][c][k] for k in ("f1", "support", "predicted", "tp")}
                          for c in used},
            "distinct_generated_reports": int(pred["report"].nunique())}


def _start_params(model_dir: Path) -> dict:
    """The training parameters a finished run was started with (first record of its train_log.jsonl)."""
    with open(model_dir / "train_log.jsonl", encoding="utf-8") as f:
        return dict(json.loads(f.readline())["params"])


def mark_slot(mask_pooled: np.ndarray, marked: list[bool], mask_index: int, shift: np.ndarray) -> np.ndarray:
    """mask_pooled (volumes, masks, levels, C) with `shift` (levels, k) added to the first k dims of mask
    `mask_index` of the marked volumes; everything else, and the dtype, unchanged."""
    out = mask_pooled.astype(np.float32)
    k = shift.shape[-1]
    out[np.asarray(marked, bool), mask_index, :, :k] += shift
    return out.astype(mask_pooled.dtype)


def slot_control(results: Path, finding: str, mask: str, experiment: str = "full", shift_sd: float = 2.0,
                 channels: int = 5) -> dict:
    """Can the LM read one mask slot at all? A control: the feature cache is copied with the `finding`'s
    positive volumes given +`shift_sd` training-set SDs in the first `channels` dims of `mask`'s pooled
    features (every level), a mark a linear probe reads; stage 1 and stage 2 are retrained
    with the experiment's parameters plus feature_norm (so the shift is `shift_sd` in the units the
    extractor sees), and the class's F1 on generated train and test reports is measured."""
    from model.network import resolve_llm_path
    from pipeline.constants import TOKEN_MASKS
    from pipeline.feature_store import FEATURE_ARRAYS, FeatureStore, write_feature_shard

    if finding not in PLANTED:
        sys.exit(f"--slot-control: finding {finding!r} is not a class the demo can plant: {list(PLANTED)}")
    if mask not in TOKEN_MASKS:
        sys.exit(f"--slot-control: mask {mask!r} is not one of {list(TOKEN_MASKS)}")
    exp = results / "experiments" / experiment
    p1, p2 = _start_params(exp / "stage1"), _start_params(exp / "stage2")
    feats, attrs = model_inputs(results, p2.get("pooling", "r2"))
    reports = {s: results / "reports" / f"{s}.parquet" for s in ("train", "validation", "test")}
    labels = pd.concat(pd.read_parquet(reports[s], columns=["volume_id", finding]) for s in reports)
    positive = set(labels.loc[labels[finding] == 1, "volume_id"])
    train_ids = set(pd.read_parquet(reports["train"], columns=["volume_id"])["volume_id"])
    if not positive & train_ids:
        sys.exit(f"--slot-control: no training volume in {results} has {finding}")
    m = TOKEN_MASKS.index(mask)
    recorded = json.loads((exp / "stage2" / "medregion_config.json").read_text(encoding="utf-8"))["llm_path"]
    llm = resolve_llm_path(recorded, exp / "stage2")
    t0 = time.perf_counter()
    # each shard read once; the mark's scale is the SD over the training volumes of all shards
    shards_in = []
    for f in feats:
        st = FeatureStore([f])
        ids = list(st.volume_ids)
        items = [st[v] for v in ids]
        shards_in.append((Path(f), ids, {k: np.stack([it[k] for it in items]) for k in FEATURE_ARRAYS}, dict(st.attrs)))
    train_pooled = np.concatenate([a["mask_pooled"][[v in train_ids for v in ids], m] for _, ids, a, _ in shards_in])
    sd = train_pooled.astype(np.float64).std(axis=0)[:, :channels]  # (levels, channels)
    with tempfile.TemporaryDirectory(prefix="slot-control-") as tmp:
        tmp = Path(tmp)
        shards = []
        for f, ids, arrays, shard_attrs in shards_in:
            arrays["mask_pooled"] = mark_slot(arrays["mask_pooled"], [v in positive for v in ids], m, shift_sd * sd)
            shards.append(str(tmp / f.name))
            write_feature_shard(Path(shards[-1]), ids, arrays, shard_attrs)
        common = ["--features", *shards, "--attributes", *attrs, "--train-reports", str(reports["train"]),
                  "--val-reports", str(reports["validation"]), "--llm", llm]
        _run([sys.executable, "-m", "model.train", "--stage", "1", "--params-json",
              json.dumps({**p1, "feature_norm": True}), *common, "--out", str(tmp / "stage1")], "control stage 1")
        _run([sys.executable, "-m", "model.train", "--stage", "2", "--params-json",
              json.dumps({**p2, "feature_norm": True}), *common, "--init", str(tmp / "stage1"),
              "--out", str(tmp / "stage2")], "control stage 2")
        out = {}
        for split in ("train", "test"):
            scores, _ = _generated_scores(tmp / "stage2", shards, attrs, reports[split])
            out[split] = {k: scores["per_class"][finding][k] for k in ("f1", "support", "predicted", "tp")}
    return {"finding": finding, "mask": mask, "shift_training_sd": shift_sd, "channels_shifted": channels,
            "positives_train": len(positive & train_ids), "stage2_params": {**p2, "feature_norm": True},
            "f1_train": out["train"], "f1_test": out["test"], "wall_s": round(time.perf_counter() - t0, 1)}


def print_ceiling_by_inputs(by_inputs: dict[str, dict]) -> None:
    """One line per planted class: its test F1 from each prompt part alone (learner chosen on the
    training split)."""
    groups = list(by_inputs)
    classes = sorted({c for r in by_inputs.values() for c in r["per_class"]}, key=PLANTED.index)
    print("test F1 per prompt part alone (learner chosen on the training split):")
    print(f"{'class':<22}" + "".join(f"{g:>12}" for g in groups))
    for c in classes:
        cells = [by_inputs[g]["per_class"].get(c, {}).get("f1_cv_chosen") for g in groups]
        print(f"{c:<22}" + "".join(f"{'-' if v is None else f'{v:.3f}':>12}" for v in cells))
    print(f"{'macro':<22}" + "".join(f"{by_inputs[g]['macro_f1_cv_chosen'] or 0:>12.3f}" for g in groups))


def run_demo(workdir: Path, configfiles: list[str], cores: int) -> float:
    # the target goes before --configfile, which takes every argument after it
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores),
           "all"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    t = time.perf_counter()
    _run(cmd, "demo workflow")
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, help="results folder of a finished demo run (default: run one)")
    ap.add_argument("--experiment", default="full")
    ap.add_argument("--configfile", action="append", default=[], help="extra --configfile for the demo run")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="run the demo in this folder and keep it")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--probe", action="store_true", help="also probe what the cached features carry")
    ap.add_argument("--reliance", action="store_true",
                    help="also measure how much the trained model's loss depends on the image features")
    ap.add_argument("--ceiling", action="store_true",
                    help="also fit simple classifiers on the training split's inputs and score them on the test split")
    ap.add_argument("--inputs", action="append", choices=list(INPUT_GROUPS), default=[],
                    help="restrict --ceiling / --probe to one prompt part (repeat for several, each on its "
                         "own): image (R2 vision tokens), image_lita, mask (mask + spatial tokens), attributes")
    ap.add_argument("--train-fit", action="store_true",
                    help="also score the model on its own training volumes (does it fit them at all?)")
    ap.add_argument("--errors", action="store_true",
                    help="also show, per planted class, the prompt number that best separates it and what the "
                         "model wrote for the test positives it missed")
    ap.add_argument("--slot-control", metavar="FINDING:MASK",
                    help="also retrain with FINDING's positives marked in MASK's pooled features (e.g. "
                         "'Cardiomegaly:heart') and score FINDING: can the LM read one mask slot at all?")
    args = ap.parse_args(argv)
    wall = None
    tmp = None
    if args.results is None:
        workdir = args.keep or Path(tmp := tempfile.mkdtemp(prefix="medregion-learning-"))
        wall = run_demo(workdir, args.configfile, args.cores)
        results = workdir / "results"
    else:
        results = args.results
    if args.inputs and not (args.ceiling or args.probe):
        sys.exit("--inputs restricts --ceiling or --probe: give one of them")
    if args.inputs and not (results / "experiments" / args.experiment / "predictions.parquet").exists():
        res = {"results": str(results)}  # the inputs alone: a cohort run through its data stages
    else:
        res = score(results, args.experiment)
    if wall is not None:
        res["demo_workflow_wall_s"] = round(wall, 1)
    if args.probe and args.inputs:
        res["probe_by_inputs"] = {g: probe(results, g) for g in args.inputs}
    elif args.probe:
        res["probe"] = probe(results)
    if args.reliance:
        res["reliance"] = reliance(results, args.experiment)
    if args.ceiling and args.inputs:
        res["ceiling_by_inputs"] = {g: ceiling(results, g) for g in args.inputs}
    elif args.ceiling:
        res["ceiling"] = ceiling(results)
    if args.train_fit:
        res["train_fit"] = train_fit(results, args.experiment)
    if args.errors:
        res["errors"] = errors(results, args.experiment)
    if args.slot_control:
        finding, _, mask = args.slot_control.rpartition(":")
        res["slot_control"] = slot_control(results, finding, mask, args.experiment)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    if "ceiling_by_inputs" in res:
        print_ceiling_by_inputs(res["ceiling_by_inputs"])
    if "ca_f1_macro_planted" not in res:  # --inputs on a cohort without a trained model: no claim to check
        if args.json:
            args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
        return 0
    print(
        f"\nCA-F1 (macro over the {len(res['classes_scored'])} planted classes with test support, "
        f"{res['test_volumes']} test volumes): model {res['ca_f1_macro_planted']:.3f}, "
        f"most-common-report baseline {res['baseline_ca_f1_macro_planted']:.3f}, gain {res['gain']:.3f}; "
        f"{res['distinct_generated_reports']} distinct reports, "
        f"{res['share_of_those_pairs_with_different_reports']:.0%} of pairs with different findings differ"
        + (f"; demo workflow {wall / 60:.1f} min" if wall else "")
    )
    if "ceiling" in res:
        c = res["ceiling"]
        print(f"ceiling from the inputs ({c['train_volumes']} training volumes -> {c['test_volumes']} test): "
              f"CA-F1 {c['macro_f1_cv_chosen']:.3f} with learners chosen on the training split, "
              f"{c['macro_f1_hindsight']:.3f} chosen with hindsight")
    if args.errors:
        for c, e in res["errors"]["per_class"].items():
            print(f"{c}: prompt evidence {e['best_attribute']} (training AUC {e['auc_train']:.3f}); test "
                  f"{e['found']}/{e['test_positives']} found, {e['false_positives']} false positives"
                  + (f"; misses written as {e['missed_written_as']}" if e["missed_written_as"] else ""))
    if args.slot_control:
        c = res["slot_control"]
        print(f"slot control ({c['finding']} marked by +{c['shift_training_sd']} SD in the {c['mask']} mask token, "
              f"{c['positives_train']} training positives): F1 train {c['f1_train']['f1']}, test {c['f1_test']['f1']}")
    print("claim (>= 0.6, >= +0.3, >= 90 % differ):", "MET" if res["claim_met"] else "NOT MET")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0 if res["claim_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
