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
