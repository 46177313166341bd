"""The learners behind `benchmarks/demo_learning.py --ceiling`: the figure that says whether the demo's
inputs can reach the learning claim at all is only as right as these."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import demo_learning as dl  # noqa: E402


def _one_informative_column(rng, n, sign, col=123, dims=400):
    y = (rng.random(n) < 0.25).astype(np.int64)
    y[:2] = 1  # at least two positives
    a = rng.normal(size=(n, dims))
    a[:, col] = sign * 3.0 * y + 0.3 * rng.normal(size=n)
    return a, y


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_stump_finds_the_one_column_that_carries_the_label_in_either_direction(sign):
    rng = np.random.default_rng(0)
    a_tr, y_tr = _one_informative_column(rng, 60, sign)
    a_te, y_te = _one_informative_column(rng, 40, sign)
    assert dl._f1(dl._stump_predict(a_tr, y_tr, a_te), y_te) == 1.0
    # ridge over 400 standardised dims blurs the same signal: why the stump is among the learners
    assert dl._f1(dl._ridge_predict(a_tr, y_tr, a_te, 1000.0), y_te) < 1.0


def test_stump_never_thresholds_between_equal_values():
    # the positives sort first among the tied 1s: cutting inside the tie would put the threshold at
    # 1.0 and call no volume with value 1 positive; the cut must fall between 1 and 0
    a = np.array([[1.0], [1.0], [1.0], [1.0], [0.0], [0.0]])
    y = np.array([1, 1, 1, 0, 0, 0])
    assert dl._stump_predict(a, y, np.array([[1.0], [0.0], [0.7]])).tolist() == [True, False, True]


def test_cross_validation_prefers_the_learner_that_generalises():
    rng = np.random.default_rng(1)
    a, y = _one_informative_column(rng, 80, 1.0)
    folds = np.array_split(rng.permutation(len(y)), 4)
    cv = {m: dl._cv_f1(a, y, m, folds) for m in dl.LEARNERS}
    assert max(cv, key=cv.get) == "stump"
    assert dl._f1(np.zeros(5, bool), np.array([0, 1, 0, 0, 1])) == 0.0


def test_slot_mark_touches_only_the_marked_volumes_mask_and_dims():
    rng = np.random.default_rng(0)
    pooled = rng.normal(size=(4, 9, 3, 8)).astype(np.float16)
    shift = np.full((3, 2), 5.0)
    out = dl.mark_slot(pooled, [True, False, True, False], 3, shift)
    assert out.dtype == pooled.dtype and out.shape == pooled.shape
    diff = out.astype(np.float32) - pooled.astype(np.float32)
    changed = np.argwhere(np.abs(diff) > 0.1)
    assert set(map(tuple, changed[:, [0, 1]])) == {(0, 3), (2, 3)}
    assert set(changed[:, 3]) == {0, 1} and set(changed[:, 2]) == {0, 1, 2}
    assert np.allclose(diff[[0, 2], 3, :, :2], 5.0, atol=0.02)


@pytest.mark.parametrize(("finding", "mask", "message"), [
    ("Cardiomegally", "heart", "not a class the demo can plant"),
    ("Cardiomegaly", "hearts", "is not one of"),
])
def test_slot_control_refuses_an_unknown_finding_or_mask(tmp_path, finding, mask, message):
    """Checked before anything is read or trained: the results folder here is empty."""
    with pytest.raises(SystemExit, match=message):
        dl.slot_control(tmp_path, finding, mask)


def test_auc_ranks_with_ties_counted_half():
    y = np.array([1, 1, 0, 0])
    assert dl._auc(np.array([3.0, 2.0, 1.0, 0.0]), y) == 1.0
    assert dl._auc(np.array([0.0, 1.0, 2.0, 3.0]), y) == 0.0
    assert dl._auc(np.array([1.0, 1.0, 1.0, 1.0]), y) == 0.5


def test_errors_names_the_prompt_number_and_what_the_misses_were_written_as(tmp_path):
    """`--errors` on a made-up results folder: effusion follows effusion_count in the training volumes
    (AUC 1.0); of three test positives one is found and two are written as pericardial effusions."""
    import pandas as pd

    from pipeline.attributes import SCHEMA

    pleural, pericardial = "Pleural effusion is observed on the left.", "A pericardial effusion was detected."
    normal = "No pleural effusion or pericardial effusion was observed."
    ids = [f"t{i}" for i in range(8)] + [f"s{i}" for i in range(4)]
    counts = [1, 1, 1, 0, 0, 0, 0, 0] + [1, 1, 1, 0]
    rows = []
    for vid, n in zip(ids, counts):
        row = {f.name: (0.0 if f.name.endswith("_ml") else 0 if f.name.endswith("_count") else []
                        if f.name.endswith(("_mm", "_locations")) else True) for f in SCHEMA}
        row.update(volume_id=vid, effusion_count=n, effusion_diameters_mm=[5.0] * n, prompt="p",
                   left_atrium_ml=float(len(rows) % 3))  # a number that carries nothing
        rows.append(row)
    (tmp_path / "attributes").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "attributes" / "shard-0.parquet")
    (tmp_path / "reports").mkdir()
    pd.DataFrame({"volume_id": ids[:8], "findings": [pleural if n else normal for n in counts[:8]]}).to_parquet(
        tmp_path / "reports" / "train.parquet")
    pd.DataFrame({"volume_id": ids[8:], "findings": [pleural if n else normal for n in counts[8:]]}).to_parquet(
        tmp_path / "reports" / "test.parquet")
    (tmp_path / "experiments" / "full").mkdir(parents=True)
    pd.DataFrame({"volume_id": ids[8:], "report": [pleural, pericardial, pericardial, normal]}).to_parquet(
        tmp_path / "experiments" / "full" / "predictions.parquet")
    out = dl.errors(tmp_path)
    assert list(out["per_class"]) == ["Pleural effusion"]  # the only planted class with support
    e = out["per_class"]["Pleural effusion"]
    assert e["best_attribute"] in {"effusion_count", "largest_effusion_mm"} and e["auc_train"] == 1.0
    assert (e["test_positives"], e["found"], e["missed"], e["false_positives"]) == (3, 1, 2, 0)
    assert e["missed_written_as"] == {"Pericardial effusion": 2}


def _made_up_results(tmp_path, n_train=40, n_test=20):
    """A results folder with real feature shards (r2 and lita) and attribute / report tables in which
    pleural effusion is carried by the attribute numbers alone (effusion_count) and cardiomegaly by
    the mask arrays alone (a block of mask_grid), everything else noise."""
    import pandas as pd

    from pipeline.attributes import SCHEMA
    from pipeline.feature_store import write_feature_shard

    rng = np.random.default_rng(0)
    n = n_train + n_test
    ids = [f"v{i:03d}" for i in range(n)]
    effusion = np.array([i % 3 == 0 for i in range(n)])
    cardio = np.array([i % 4 == 1 for i in range(n)])
    shapes = {"global": (4, 6), "region": (6, 6), "mask_pooled": (9, 2, 6), "mask_grid": (9, 2, 4, 4)}
    arrays = {k: rng.normal(size=(n, *s)).astype(np.float16) for k, s in shapes.items()}
    arrays["mask_grid"][cardio, 3] += 4.0
    arrays["region_slices"] = np.zeros((n, 6), np.int16)
    arrays["mask_present"] = np.ones((n, 9), bool)
    for pooling in ("r2", "lita"):
        write_feature_shard(tmp_path / "features" / f"demo-{pooling}" / "shard-0.zarr", ids, arrays,
                            {"pooling": pooling})
    rows = []
    for i, vid in enumerate(ids):
        row = {f.name: (float(rng.normal()) if f.name.endswith("_ml") else 0 if f.name.endswith("_count")
                        else [] if f.name.endswith(("_mm", "_locations")) else True) for f in SCHEMA}
        row.update(volume_id=vid, effusion_count=int(effusion[i]), effusion_diameters_mm=[5.0] * int(effusion[i]),
                   prompt="p")
        rows.append(row)
    (tmp_path / "attributes").mkdir()
    pd.DataFrame(rows).to_parquet(tmp_path / "attributes" / "shard-0.parquet")

    def text(i):
        parts = ["Pleural effusion is observed on the left." if effusion[i] else "No pleural effusion."]
        parts.append("Cardiomegaly is present." if cardio[i] else "Heart size is normal.")
        return " ".join(parts)

    (tmp_path / "reports").mkdir()
    for split, sl in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
        pd.DataFrame({"volume_id": ids[sl], "findings": [text(i) for i in range(n)[sl]]}).to_parquet(
            tmp_path / "reports" / f"{split}.parquet")
    pd.DataFrame({"volume_id": [], "findings": []}).to_parquet(tmp_path / "reports" / "validation.parquet")
    return tmp_path


def test_ceiling_by_inputs_finds_each_class_only_in_the_part_that_carries_it(tmp_path):
    """`--ceiling --inputs`: effusion is read from the attribute numbers and not from the mask arrays,
    cardiomegaly the other way round; the image groups carry neither."""
    results = _made_up_results(tmp_path)
    by = {g: dl.ceiling(results, g)["per_class"] for g in ("attributes", "mask", "image", "image_lita")}
    assert by["attributes"]["Pleural effusion"]["f1_cv_chosen"] == 1.0
    assert by["mask"]["Cardiomegaly"]["f1_cv_chosen"] == 1.0
    assert by["attributes"]["Cardiomegaly"]["f1_cv_chosen"] < 0.7
    assert by["mask"]["Pleural effusion"]["f1_cv_chosen"] < 0.7
    for g in ("image", "image_lita"):
        assert by[g]["Pleural effusion"]["f1_cv_chosen"] < 0.7 and by[g]["Cardiomegaly"]["f1_cv_chosen"] < 0.7
    assert by["mask"]["Cardiomegaly"]["chosen"].endswith(("mask_grid (r2)", "mask (all)"))
    assert by["image_lita"]["Cardiomegaly"]["chosen"].split(" on ")[1] in {"global (lita)", "region (lita)",
                                                                         "image_lita (all)"}


def test_inputs_option_runs_on_a_cohort_without_a_model_and_refuses_without_ceiling(tmp_path, capsys):
    results = _made_up_results(tmp_path)
    out = tmp_path / "ceiling.json"
    assert dl.main(["--results", str(results), "--ceiling", "--inputs", "attributes", "--inputs", "mask",
                    "--json", str(out)]) == 0
    import json

    res = json.loads(out.read_text())
    assert set(res["ceiling_by_inputs"]) == {"attributes", "mask"}
    printed = capsys.readouterr().out
    assert "test F1 per prompt part alone" in printed and "Cardiomegaly" in printed
    with pytest.raises(SystemExit, match="restricts --ceiling or --probe"):
        dl.main(["--results", str(results), "--inputs", "mask"])
    with pytest.raises(SystemExit, match="no features/\\*-lita"):
        dl.input_groups(tmp_path / "nowhere", ["v000"], "image_lita")
