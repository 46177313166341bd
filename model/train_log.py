"""A training run's log: `<out>/train_log.jsonl`, its numbers as tracker scalars, and the loss plot.

One JSON record per line, written by the main process: event records (`start` / `resume`, `stopped`,
`done`, `selected`), step records (`loss`, `lr`, `elapsed_s`) and epoch records (`val_loss`, and with
`select_by: val_ca_f1` the validation clinical F1). With a tracker (`log_with: tensorboard`) the step
and epoch numbers also go to Accelerate's tracker.
"""

from __future__ import annotations

import json
from pathlib import Path

from accelerate import Accelerator

from pipeline.io import atomic_output


def read_log(path: Path) -> list[dict]:
    """The records of a train_log.jsonl (none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def tracker_values(record: dict) -> dict[str, float]:
    """The numbers of a train_log.jsonl step or epoch record as tracker scalars: `train/loss`, `train/lr`,
    `val/loss`, `val/ca_f1`, `val/ca_f1_per_class/<class>`; event records (start, done, ...) give none."""
    if "event" in record:
        return {}
    group = "val" if any(k.startswith("val_") for k in record) else "train"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "epoch", "elapsed_s") or isinstance(value, bool):
            continue
        name = key[4:] if key.startswith("val_") else key
        if isinstance(value, (int, float)) and value == value:
            out[f"{group}/{name}"] = float(value)
        elif isinstance(value, dict):  # per-class scores
            out.update({f"{group}/{name}/{k}": float(v) for k, v in value.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and v == v})
    return out


class TrainLog:
    """`<out>/train_log.jsonl`, appended to by the main process; scalars to the tracker when `tracking`."""

    def __init__(self, path: Path, accelerator: Accelerator, tracking: bool):
        self.path, self.accelerator, self.tracking = path, accelerator, tracking

    def write(self, record: dict) -> None:
        """Append `record` (main process); every process passes its scalars to the tracker."""
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = tracker_values(record) if self.tracking else {}
        if scalars:
            self.accelerator.log(scalars, step=record.get("step", 0))

    def records(self) -> list[dict]:
        return read_log(self.path)

    def keep_until(self, step: int) -> None:
        """Drop the records of work after `step` (a resumed run does it again); main process only."""
        recs = [r for r in self.records() if r.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")

    def remove(self) -> None:
        """Forget an earlier run's records (a fresh start); main process only."""
        if self.path.exists():
            self.path.unlink()


def plot_loss(log_path: Path, png_path: Path) -> None:
    """Training and validation loss per optimizer step, with the validation clinical F1 and the selected
    epoch when the run selected by it; written atomically."""
    # matplotlib only here, at the end of a run on the main process: its import costs every process ~0.5 s
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = read_log(log_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    f1 = [(r["step"], r["val_ca_f1"]) for r in recs if r.get("val_ca_f1") is not None]
    chosen = [r["step"] for r in recs if r.get("event") == "selected" and r.get("val_ca_f1") is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (target tokens)")
    ax.set_title(png_path.parent.name)
    handles, labels = ax.get_legend_handles_labels()
    if f1:
        ax2 = ax.twinx()
        handles += ax2.plot(*zip(*f1), "s-", color="tab:green", label="validation clinical F1")
        labels.append("validation clinical F1")
        for step in chosen:
            handles.append(ax2.axvline(step, color="tab:green", ls=":", label="selected weights"))
            labels.append("selected weights")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("macro F1 (generated validation reports)")
    ax.legend(handles, labels)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_output(png_path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")  # the temporary's name has no .png suffix
    finally:
        plt.close(fig)
