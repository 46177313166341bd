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

`--train-fit` scores the model on its own training volumes the same way (generated here): a low value
means the model underfits the demo, so more data alone would not help.

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


def probe(results: Path) -> dict:
    from pipeline.feature_store import FeatureStore

    store = FeatureStore(model_inputs(results)[0])
    reps = pd.concat(pd.read_parquet(results / "reports" / f"{s}.parquet") for s in ("train", "validation", "test"))
    reps = reps[reps["volume_id"].isin(set(store.volume_ids))]
    y_all = label_reports(reps["findings"].tolist())
    feats: dict[str, list] = {k: [] for k in ("global", "region", "mask_pooled", "mask_grid")}
    for v in reps["volume_id"]:
        f = store[v]
        for k in feats:
            feats[k].append(np.asarray(f[k], np.float32).ravel())
    x = {k: np.stack(v) for k, v in feats.items()}
    rng = np.random.default_rng(0)
    n = len(reps)
    folds = np.array_split(rng.permutation(n), 4)

    def cv_f1(a: np.ndarray, y: np.ndarray) -> float:
        best = 0.0
        for lam in (1.0, 30.0, 1000.0):
            pred = np.zeros(n, bool)
            for te in folds:
                tr = np.setdiff1d(np.arange(n), te)
                mu, sd = a[tr].mean(0), a[tr].std(0) + 1e-6
                at, ae = (a[tr] - mu) / sd, (a[te] - mu) / sd
                alpha = np.linalg.solve(at @ at.T + lam * np.eye(len(tr)), 2.0 * y[tr] - 1.0)
                pred[te] = (ae @ at.T @ alpha) > 0
            tp, fp, fn = (pred & (y == 1)).sum(), (pred & (y == 0)).sum(), (~pred & (y == 1)).sum()
            best = max(best, 2 * tp / max(1, 2 * tp + fp + fn))
        return float(best)

    out = {}
    for c in PLANTED:
        y = y_all[:, CTRATE_CLASSES.index(c)]
        if y.sum() < 4:
            continue
        prev = y.mean()
        out[c] = {"positives": int(y.sum()), "chance_f1": round(float(2 * prev / (1 + prev)), 3),
                  **{k: round(cv_f1(a, y), 3) for k, a in x.items()}}
    return {"volumes": n, "per_class": out}


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


def train_fit(results: Path, experiment: str = "full") -> dict:
    """CA-F1 of the trained model on its own training volumes (reports generated here, as the generate
    rule does for the test split): low means the model underfits, not that it fails to generalise."""
    model_dir = results / "experiments" / experiment / "stage2"
    pooling = json.loads((model_dir / "medregion_config.json").read_text(encoding="utf-8"))["pooling"]
    feats, attrs = model_inputs(results, "lita" if pooling == "lita" else "r2")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "train_predictions.parquet"
        cmd = [sys.executable, "-m", "model.generate", "--model", str(model_dir),
               "--features", *feats, "--attributes", *attrs, "--reports", str(results / "reports" / "train.parquet"),
               "--out", str(out), "--max-new-tokens", "200", "--batch-size", "8"]
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
        if proc.returncode != 0:
            sys.exit(f"generation on the training split failed:\n{proc.stderr[-3000:]}")
        pred = pd.read_parquet(out)
    train = pd.read_parquet(results / "reports" / "train.parquet").set_index("volume_id").loc[pred["volume_id"]]
    scores = clinical_scores(label_reports(train["findings"].tolist()), label_reports(pred["report"].fillna("").tolist()))
    f1, used = macro_over(scores, PLANTED)
    return {"train_volumes": len(pred), "ca_f1_macro_planted": f1, "classes_scored": used,
            "distinct_generated_reports": int(pred["report"].nunique())}


def run_demo(workdir: Path, configfiles: list[str], cores: int) -> float:
    # the target goes before --configfile, which takes every argument after it
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", str(cores),
           "all"]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        sys.exit(f"demo workflow failed:\n{proc.stderr[-4000:]}")
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
    ap.add_argument("--train-fit", action="store_true",
                    help="also score the model on its own training volumes (does it fit them at all?)")
    args = ap.parse_args(argv)
    wall = None
    tmp = None
    if args.results is None:
        workdir = args.keep or Path(tmp := tempfile.mkdtemp(prefix="medregion-learning-"))
        wall = run_demo(workdir, args.configfile, args.cores)
        results = workdir / "results"
    else:
        results = args.results
    res = score(results, args.experiment)
    if wall is not None:
        res["demo_workflow_wall_s"] = round(wall, 1)
    if args.probe:
        res["probe"] = probe(results)
    if args.reliance:
        res["reliance"] = reliance(results, args.experiment)
    if args.train_fit:
        res["train_fit"] = train_fit(results, args.experiment)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(res, indent=2))
    print(
        f"\nCA-F1 (macro over the {len(res['classes_scored'])} planted classes with test support, "
        f"{res['test_volumes']} test volumes): model {res['ca_f1_macro_planted']:.3f}, "
        f"most-common-report baseline {res['baseline_ca_f1_macro_planted']:.3f}, gain {res['gain']:.3f}; "
        f"{res['distinct_generated_reports']} distinct reports, "
        f"{res['share_of_those_pairs_with_different_reports']:.0%} of pairs with different findings differ"
        + (f"; demo workflow {wall / 60:.1f} min" if wall else "")
    )
    print("claim (>= 0.6, >= +0.3, >= 90 % differ):", "MET" if res["claim_met"] else "NOT MET")
    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    return 0 if res["claim_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
