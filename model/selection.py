"""Choose the trained weights by the clinical F1 of reports generated for the validation split.

Validation loss is a poor guide to when the findings are learned: on the demo cohort it is lowest
many epochs before the model names the findings. With `select_by: val_ca_f1` the trainer generates the
validation reports every `select_every` epochs, labels them and the reference findings with the rule
labeler (`pipeline.evaluate.labeler`), and keeps the trainable weights of the epoch with the highest
macro F1 (over the classes present in the references). The final folder holds those weights.

`BestWeights` keeps the best weights on disk (`<out>/selection/`), so a resumed run still knows them.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

SELECT_BY = ("last", "val_ca_f1")
WEIGHTS_FILE, RECORD_FILE = "best.safetensors", "best.json"


def report_text(raw: str, stage: int) -> str:
    """The report a generated text stands for: stage 2 merges its parsed region sections (as the
    generate rule does), stage 1 generates the report itself."""
    from model.prompt import merge_regions, parse_structured

    return merge_regions(parse_structured(raw)) if stage == 2 else (raw or "")


def macro_ca_f1(references: Sequence[str], reports: Sequence[str]) -> tuple[float | None, dict[str, float]]:
    """Macro F1 of the rule labeler's 18 CT-RATE classes over the classes with support in
    `references`, and the F1 per such class. None when no reference names any class."""
    from pipeline.evaluate.clinical import clinical_scores
    from pipeline.evaluate.labeler import CLASSES, label_reports

    if len(references) != len(reports):
        raise ValueError(f"{len(references)} references but {len(reports)} reports")
    scores = clinical_scores(label_reports(list(references)), label_reports(list(reports)), CLASSES)
    # clinical_scores' macro_f1 already leaves out the classes without reference support
    per_class = {c: s["f1"] for c, s in scores["per_class"].items() if s["f1"] is not None}
    return scores["macro_f1"], per_class


def reference_texts(reports: str | os.PathLike, volume_ids: Sequence[str]) -> list[str]:
    """The reference findings of `volume_ids` from a reports parquet: its `findings` column, else its
    region columns merged as a generated report is."""
    import pandas as pd

    from model.prompt import merge_regions
    from pipeline.constants import REGIONS

    df = pd.read_parquet(reports).drop_duplicates("volume_id").set_index("volume_id")
    missing = [v for v in volume_ids if v not in df.index]
    if missing:
        raise ValueError(f"{reports}: no report for volume(s) {missing[:5]}")
    df = df.loc[list(volume_ids)]
    if "findings" in df.columns:
        return df["findings"].fillna("").astype(str).tolist()
    if all(r in df.columns for r in REGIONS):
        return [merge_regions({r: row[r] or "" for r in REGIONS}) for _, row in df.iterrows()]
    raise ValueError(f"{reports}: neither a findings column nor the six region columns {REGIONS}")


class BestWeights:
    """The best-scoring trainable weights so far, kept in `folder` (written atomically)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.record: dict | None = None
        record, weights = self.folder / RECORD_FILE, self.folder / WEIGHTS_FILE
        if record.exists() and weights.exists():
            self.record = json.loads(record.read_text(encoding="utf-8"))
            if _weights_step(weights) != str(self.record.get("step")):
                # killed between the two replaces of offer(): the record's weights are gone, and the
                # newer weights' epoch is scored again by the resumed run (its log line comes after)
                self.clear()

    @property
    def score(self) -> float | None:
        return None if self.record is None else self.record["score"]

    def offer(self, score: float | None, state: Mapping[str, torch.Tensor], **info) -> bool:
        """Keep `state` if `score` beats the best so far (ties keep the earlier weights); True if kept."""
        if score is None or (self.score is not None and score <= self.score):
            return False
        from safetensors.torch import save_file

        from pipeline.io import atomic_output

        # weights, then the record; each replaced atomically. The weights carry their step, so a pair
        # left mismatched by a kill between the two replaces is recognised
        with atomic_output(self.folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"step": str(info.get("step"))})
        self.record = {"score": float(score), **info}
        with atomic_output(self.folder / RECORD_FILE) as tmp:
            tmp.write_text(json.dumps(self.record, indent=2) + "\n", encoding="utf-8")
        return True

    def state(self) -> dict[str, torch.Tensor]:
        """The kept weights; refuses weights that do not belong to the record (interrupted write)."""
        from safetensors.torch import load_file

        if self.record is None:
            raise FileNotFoundError(f"{self.folder}: no selected weights")
        path = self.folder / WEIGHTS_FILE
        step = _weights_step(path)
        if step != str(self.record.get("step")):
            raise RuntimeError(f"{path} is from step {step}, {RECORD_FILE} names step {self.record.get('step')}")
        return load_file(str(path))

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.record = None


def _weights_step(path: Path) -> str | None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("step")
