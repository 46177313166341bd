"""Curves while training: with `log_with: tensorboard` the trainer writes TensorBoard event files (through
Accelerate's tracker) holding the same losses, learning rates, validation losses and clinical F1 as
train_log.jsonl, which is still written; without it no event file appears."""

from __future__ import annotations

import pytest
from helpers import log_records, run_cli, train_args

from model.train import tracker_values


def _scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = list(folder.rglob("events.out.tfevents.*"))
    assert files, f"no event file under {folder}"
    acc = EventAccumulator(str(files[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_event_file_holds_the_jsonl_curves(tiny, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "stage2"
    params = {"epochs": 2, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0,
              "mask_hidden": 24, "lora_r": 4, "lora_alpha": 8, "select_by": "val_ca_f1",
              "select_max_new_tokens": 16, "log_with": "tensorboard"}
    run_cli("model.train", *train_args(tiny, 2, out, params))
    recs = log_records(out)
    scalars = _scalars(out / "tensorboard")
    losses = [(r["step"], r["loss"]) for r in recs if "loss" in r and "event" not in r]
    assert len(losses) >= 2
    assert [s for s, _ in scalars["train/loss"]] == [s for s, _ in losses]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx([v for _, v in losses], rel=1e-6)
    assert len(scalars["train/lr"]) == len(losses)
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    assert [v for _, v in scalars["val/loss"]] == pytest.approx([v for _, v in val], rel=1e-6)
    f1 = [r["val_ca_f1"] for r in recs if r.get("val_ca_f1") is not None and "event" not in r]
    assert [v for _, v in scalars["val/ca_f1"]] == pytest.approx(f1, rel=1e-6)


def test_no_tracker_by_default(tiny, tmp_path):
    out = tmp_path / "stage1"
    params = {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 1e-2, "log_every": 1, "checkpoint_every": 0}
    run_cli("model.train", *train_args(tiny, 1, out, params))
    assert log_records(out) and not (out / "tensorboard").exists()


def test_tracker_values_keep_numbers_and_per_class_scores() -> None:
    assert tracker_values({"event": "start", "step": 0, "trainable_params": 10}) == {}
    assert tracker_values({"step": 3, "epoch": 0.5, "loss": 1.5, "lr": 0.01, "elapsed_s": 2.0}) == {
        "train/loss": 1.5, "train/lr": 0.01}
    got = tracker_values({"step": 4, "epoch": 1, "val_loss": 0.7, "val_ca_f1": 0.5, "selected": True,
                          "val_ca_f1_per_class": {"Cardiomegaly": 1.0, "Lung nodule": None}})
    assert got == {"val/loss": 0.7, "val/ca_f1": 0.5, "val/ca_f1_per_class/Cardiomegaly": 1.0}
