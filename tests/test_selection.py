"""model/selection.py: the validation clinical F1, the reference texts, the kept best weights (and what a
resumed run finds of them), and the trainer's checks of the selection parameters."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from model.selection import RECORD_FILE, WEIGHTS_FILE, BestWeights, macro_ca_f1, reference_texts, report_text
from model.train import TrainConfigError, resolve_params
from pipeline.constants import REGIONS


def test_macro_f1_is_over_the_classes_the_references_name():
    refs = ["A nodule in the right upper lobe.", "Pleural effusion on the left.", "The lungs are clear."]
    # nodule found, effusion missed, and a false cardiomegaly where the references never name it
    hyps = ["A nodule in the right upper lobe.", "The lungs are clear.", "Cardiomegaly."]
    f1, per_class = macro_ca_f1(refs, hyps)
    assert set(per_class) == {"Lung nodule", "Pleural effusion"}  # no support: not averaged
    assert per_class == {"Lung nodule": 1.0, "Pleural effusion": 0.0}
    assert f1 == 0.5
    assert macro_ca_f1(["The lungs are clear."], ["Cardiomegaly."]) == (None, {})
    with pytest.raises(ValueError, match="2 references but 1 reports"):
        macro_ca_f1(refs[:2], hyps[:1])


def test_report_text_merges_stage2_sections_and_keeps_stage1_text():
    raw = "[Lung]: A nodule. [Heart]: Cardiomegaly."
    assert report_text(raw, 2) == "A nodule. Cardiomegaly."
    assert report_text(raw, 1) == raw
    assert report_text("no sections at all", 2) == ""


def test_reference_texts_follow_the_requested_order(tmp_path):
    df = pd.DataFrame({"volume_id": ["a", "b"], "findings": ["Nodule.", None],
                       **{r: [f"{r} a.", ""] for r in REGIONS}})
    df.to_parquet(tmp_path / "with.parquet")
    assert reference_texts(tmp_path / "with.parquet", ["b", "a"]) == ["", "Nodule."]
    df.drop(columns="findings").to_parquet(tmp_path / "regions.parquet")
    merged = reference_texts(tmp_path / "regions.parquet", ["a"])[0]
    assert merged == " ".join(f"{r} a." for r in REGIONS)
    with pytest.raises(ValueError, match=r"regions.parquet.*'c'"):
        reference_texts(tmp_path / "regions.parquet", ["c"])
    df[["volume_id"]].to_parquet(tmp_path / "bare.parquet")
    with pytest.raises(ValueError, match="neither a findings column"):
        reference_texts(tmp_path / "bare.parquet", ["a"])


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"connector.w": torch.full((2, 3), value), "llm.lora_A": torch.full((4,), -value)}


def test_best_weights_keep_the_highest_score_and_survive_a_restart(tmp_path):
    best = BestWeights(tmp_path / "sel")
    assert best.score is None
    assert not best.offer(None, _state(0.0), step=1, epoch=1)  # an unscored epoch is never kept
    assert best.offer(0.5, _state(1.0), step=10, epoch=1)
    assert not best.offer(0.4, _state(2.0), step=20, epoch=2)
    assert not best.offer(0.5, _state(3.0), step=30, epoch=3)  # a tie keeps the earlier weights
    assert best.offer(0.7, _state(4.0), step=40, epoch=4)
    assert not best.offer(0.6, _state(5.0), step=50, epoch=5)
    resumed = BestWeights(tmp_path / "sel")  # what a resumed run finds
    assert resumed.record == {"score": 0.7, "step": 40, "epoch": 4}
    got = resumed.state()
    assert got.keys() == _state(0).keys() and all(torch.equal(got[k], _state(4.0)[k]) for k in got)
    assert not list((tmp_path / "sel").glob("*.tmp"))
    resumed.clear()
    assert not (tmp_path / "sel").exists() and BestWeights(tmp_path / "sel").score is None


def test_weights_and_record_left_mismatched_by_a_kill_are_dropped(tmp_path):
    best = BestWeights(tmp_path / "sel")
    best.offer(0.5, _state(1.0), step=10, epoch=1)
    # killed after the new weights were renamed into place, before the new record was
    (tmp_path / "sel" / RECORD_FILE).write_text(json.dumps({"score": 0.3, "step": 5, "epoch": 0}))
    resumed = BestWeights(tmp_path / "sel")
    assert resumed.record is None and not (tmp_path / "sel" / WEIGHTS_FILE).exists()
    assert resumed.offer(0.1, _state(2.0), step=20, epoch=2)  # the resumed run scores its epochs again


def test_state_refuses_weights_of_another_step(tmp_path):
    best = BestWeights(tmp_path / "sel")
    best.offer(0.5, _state(1.0), step=10, epoch=1)
    best.record["step"] = 11
    with pytest.raises(RuntimeError, match="from step 10"):
        best.state()
    with pytest.raises(FileNotFoundError):
        BestWeights(tmp_path / "none").state()


@pytest.mark.parametrize("bad, message", [
    ({"select_by": "val_loss"}, "select_by must be one of"),
    ({"select_by": "val_ca_f1", "select_every": 0}, "select_every must be"),
    ({"select_every": 1.5}, "select_every must be"),
])
def test_trainer_refuses_bad_selection_parameters(bad, message):
    with pytest.raises(TrainConfigError, match=message):
        resolve_params(2, json.dumps(bad))
    assert resolve_params(2, json.dumps({"select_by": "val_ca_f1", "select_every": 3}))["select_every"] == 3
