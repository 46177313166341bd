"""Uncertainty (pipeline.evaluate.bootstrap), scores.parquet and the paired comparison of the ablation table.
~10 s (no Java: METEOR's jar entries are passed as not run)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.constants import CTRATE_CLASSES
from pipeline.evaluate import bootstrap
from pipeline.evaluate.clinical import clinical_scores
from pipeline.evaluate.nlg import (
    PER_REPORT_KEYS,
    MeteorNotRun,
    WordNetNotRun,
    corpus_bleu_from_stats,
    nlg_scores,
)
from pipeline.evaluate.table import build_table, paired_table, write_tables

SENTENCES = [
    "the heart is normal in size", "no pleural effusion is seen", "a nodule in the right upper lobe",
    "the trachea and main bronchi are open", "mild emphysema in both lungs", "no lymphadenopathy",
    "degenerative changes of the spine", "the liver is unremarkable", "atelectasis in the left lower lobe",
]


def _labels(rng: np.random.Generator, n: int) -> np.ndarray:
    return (rng.random((n, len(CTRATE_CLASSES))) < 0.3).astype(np.int64)


def test_multiplicities_are_seeded_resamples_of_every_volume():
    a = bootstrap.multiplicities(50, 200, seed=3)
    assert a.shape == (200, 50) and np.all(a.sum(axis=1) == 50) and np.all(a >= 0)
    assert np.array_equal(a, bootstrap.multiplicities(50, 200, seed=3))  # same seed, same numbers
    assert not np.array_equal(a, bootstrap.multiplicities(50, 200, seed=4))
    with pytest.raises(ValueError):
        bootstrap.multiplicities(0, 10)


def test_mean_ci_contains_the_point_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 1000):
        v = rng.beta(2, 5, n)
        b = bootstrap.mean_block(v, bootstrap.multiplicities(n, 1000, seed=0))
        assert b["ci95"][0] < b["mean"] < b["ci95"][1]
        assert b["mean"] == pytest.approx(v.mean()) and b["std"] == pytest.approx(v.std(ddof=1))
        widths.append(b["ci95"][1] - b["ci95"][0])
    assert widths[1] < widths[0] / 3
    # NaN = a volume without a pair (an empty region): left out of the mean and of each resample's mean
    v = np.array([0.2, np.nan, 0.4, np.nan])
    b = bootstrap.mean_block(v, bootstrap.multiplicities(4, 500, seed=0))
    assert b["mean"] == pytest.approx(0.3) and b["n"] == 2
    assert 0.2 - 1e-12 <= b["ci95"][0] < b["ci95"][1] <= 0.4 + 1e-12


def test_f1_of_all_volumes_is_clinical_scores_and_its_ci_contains_it():
    rng = np.random.default_rng(1)
    ref, hyp = _labels(rng, 300), _labels(rng, 300)
    hyp[:150] = ref[:150]  # half the volumes right
    ref[:, 5] = 0  # a class without support: out of the macro, as in clinical_scores
    full = bootstrap.f1_from_labels(ref, hyp, np.ones((1, 300)))
    expected = clinical_scores(ref, hyp)
    for key in ("macro_f1", "micro_f1", "weighted_f1"):
        assert full[key][0] == pytest.approx(expected[key], abs=1e-12), key
    ci = bootstrap.f1_intervals(ref, hyp, bootstrap.multiplicities(300, 1000, seed=0))
    for key in ("macro_f1", "micro_f1", "weighted_f1"):
        lo, hi = ci[f"{key}_ci95"]
        assert lo < expected[key] < hi, key


def test_paired_bootstrap_identical_planted_and_seeded():
    rng = np.random.default_rng(2)
    a = rng.random(200)
    same = bootstrap.paired_difference(bootstrap.mean_stat(a), bootstrap.mean_stat(a.copy()), 200)
    assert same["difference"] == 0.0 and same["ci95"] == [0.0, 0.0] and same["p_value"] == 1.0
    better = np.clip(a + 0.2 + 0.05 * rng.standard_normal(200), 0, None)
    planted = bootstrap.paired_difference(bootstrap.mean_stat(a), bootstrap.mean_stat(better), 200)
    assert planted["difference"] == pytest.approx(better.mean() - a.mean())
    assert planted["p_value"] < 0.01 and planted["ci95"][0] > 0.1
    again = bootstrap.paired_difference(bootstrap.mean_stat(a), bootstrap.mean_stat(better), 200)
    assert again == planted
    # noise only: no significant difference, the CI straddles 0
    noise = a + 0.01 * rng.standard_normal(200)
    res = bootstrap.paired_difference(bootstrap.mean_stat(a), bootstrap.mean_stat(noise), 200)
    assert res["ci95"][0] < 0 < res["ci95"][1] or res["p_value"] > 0.01
    # CA-F1 as a whole: identical labels p = 1, a much better labeller p < 0.01
    ref, hyp = _labels(rng, 200), _labels(rng, 200)
    same = bootstrap.paired_difference(bootstrap.macro_f1_stat(ref, hyp), bootstrap.macro_f1_stat(ref, hyp.copy()), 200)
    assert same["difference"] == 0.0 and same["p_value"] == 1.0
    good = hyp.copy()
    good[:160] = ref[:160]
    planted = bootstrap.paired_difference(bootstrap.macro_f1_stat(ref, hyp), bootstrap.macro_f1_stat(ref, good), 200)
    assert planted["difference"] > 0.3 and planted["p_value"] < 0.01


def test_corpus_bleu_is_rebuilt_from_per_pair_statistics():
    rng = np.random.default_rng(3)
    refs = [" ".join(rng.choice(SENTENCES, 3)) for _ in range(40)]
    hyps = [" ".join(rng.choice(SENTENCES, int(rng.integers(1, 4)))) for _ in range(40)]
    s = nlg_scores(refs, hyps, meteor=MeteorNotRun("x"), wordnet=WordNetNotRun("x"), per_pair=True)
    rebuilt = corpus_bleu_from_stats(s["_bleu_stats"].sum(axis=0))
    for n in range(4):
        assert rebuilt[n] == pytest.approx(s[f"BLEU-{n + 1}"]["value"], rel=1e-9)
    # a subset's statistics give that subset's pycocoevalcap corpus BLEU
    sub = nlg_scores(refs[:15], hyps[:15], meteor=MeteorNotRun("x"), wordnet=WordNetNotRun("x"))
    assert corpus_bleu_from_stats(s["_bleu_stats"][:15].sum(axis=0))[3] == pytest.approx(sub["BLEU-4"]["value"], rel=1e-9)


def _experiment(rng: np.random.Generator, n: int, quality: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions, references) where a fraction ``quality`` of the reports is copied from the reference."""
    from pipeline.constants import REGIONS

    refs = [". ".join(rng.choice(SENTENCES, 4)) for _ in range(n)]
    hyps = [r if rng.random() < quality else ". ".join(rng.choice(SENTENCES, 4)) for r in refs]
    ids = [f"v{i:03d}" for i in range(n)]
    ref = pd.DataFrame({"volume_id": ids, "findings": refs, **{r: [""] * n for r in REGIONS}})
    ref["lung"] = refs
    pred = pd.DataFrame({"volume_id": ids, "report": hyps, **{r: [""] * n for r in REGIONS}})
    pred["lung"] = hyps
    return pred, ref


def test_scores_frame_and_paired_ablation_table(tmp_path):
    from pipeline.evaluate.run import score_experiment

    rng = np.random.default_rng(4)
    kw = {"meteor": MeteorNotRun("no java in this test"), "wordnet": WordNetNotRun("no wordnet in this test"),
          "n_resamples": 300}
    pred, ref = _experiment(rng, 60, 0.2)
    full_m, full_s = score_experiment(pred, ref, "full", **kw)
    same_m, same_s = score_experiment(pred, ref, "same", **kw)
    better_pred = pred.copy()
    better_pred["report"] = ref["findings"]  # a perfect generator
    better_pred["lung"] = ref["lung"]
    better_m, better_s = score_experiment(better_pred, ref, "better", **kw)

    # scores.parquet: one row per volume, one column per part x per-report metric, plus the labels
    assert list(full_s["volume_id"]) == list(pred["volume_id"]) and len(full_s) == 60
    for key in PER_REPORT_KEYS:
        assert f"report/{key}" in full_s and f"lung/{key}" in full_s and f"heart/{key}" in full_s
        entry = full_m["nlg"]["report"][key]
        if entry.get("status") != "not run":
            assert full_s[f"report/{key}"].mean() == pytest.approx(entry["value"])
            assert entry["ci95"][0] <= entry["value"] <= entry["ci95"][1]
    assert full_s["heart/ROUGE-L evaluate"].isna().all()  # empty on both sides: no pair
    assert full_s["report/METEOR evaluate"].isna().all()  # not run
    for c in CTRATE_CLASSES:
        assert f"reference label/{c}" in full_s and f"prediction label/{c}" in full_s
    # same seed, same numbers
    assert score_experiment(pred, ref, "full", **kw)[0]["nlg"] == full_m["nlg"]

    scores = {"full": full_s, "same": same_s, "better": better_s}
    paired = paired_table(scores, "full", n_resamples=300).set_index("experiment")
    assert paired.loc["same", "vs full: BLEU-4 difference"] == 0.0
    assert paired.loc["same", "vs full: ROUGE-L p"] == 1.0
    assert paired.loc["same", "vs full: CA-F1 macro p"] == 1.0
    assert paired.loc["better", "vs full: BLEU-4 difference"] > 0.3
    assert paired.loc["better", "vs full: BLEU-4 p"] < 0.01 and paired.loc["better", "vs full: ROUGE-L p"] < 0.01
    assert paired.loc["better", "vs full: METEOR column"] == "report/METEOR-NLTK report-mean"  # WordNet not run

    df, impls, loaded = build_table([full_m, same_m, better_m])
    out = tmp_path / "tables"
    write_tables(df, impls, out, loaded, scores, "full", n_resamples=300)
    csv = pd.read_csv(out / "ablation.csv")
    assert "vs full: METEOR ci95 low" in csv and pd.isna(csv.loc[0, "vs full: BLEU-4 difference"])
    assert csv.loc[2, "vs full: BLEU-4 p"] < 0.01
    md = (out / "ablation.md").read_text(encoding="utf-8")
    assert "Paired bootstrap against `full`" in md and "| better | 60 |" in md and "±" in md
    # no baseline among the experiments: said so, no paired columns
    write_tables(df, impls, tmp_path / "t2", loaded, {"same": same_s, "better": better_s}, "full", n_resamples=50)
    assert "No paired comparison" in (tmp_path / "t2" / "ablation.md").read_text(encoding="utf-8")
