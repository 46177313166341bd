"""Training settings of one stage: the train rule's `--params-json` object as a frozen dataclass.

The train rule passes `{**train.stage<N>, **experiment settings (pooling, use_mask_tokens,
use_attributes), log_with if train.log_with is set}`; `parse_train_settings` turns it into a
`TrainSettings`, refusing unknown keys with the nearest one named (`pipeline.stage_config`). Two
defaults depend on the stage (MedRegion-CT (the paper), Sec. 2 "Training": learning rate 1e-4 and
batch 4 x 8 for stage 1, 2e-5 and 1 x 8 for stage 2); the workflow schema's `train.stage1` and
`train.stage2` sections hold the same defaults (tests/test_train_settings.py keeps them equal).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from model.selection import SELECT_BY
from pipeline.stage_config import SettingsError, parse_settings


class TrainConfigError(ValueError):
    """Training settings or inputs the trainer refuses; the CLI exits with the message."""


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One stage's training settings; the field order is that of the logged `params` record."""

    epochs: int = 3
    lr: float | None = None  # None: the stage's default (STAGE_DEFAULTS)
    batch_size: int | None = None  # None: the stage's default (paper: 4 x 8 and 1 x 8)
    grad_accum: int = 8
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0  # 0 or None: no clipping
    max_length: int = 2048
    seed: int = 0
    use_mask_tokens: bool = True  # set by the experiment (config `experiments.<name>`)
    use_attributes: bool = True  # set by the experiment
    connector: str = "linear"  # "linear" (paper) | "mlp"
    feature_norm: bool = False
    mask_hidden: int = 1024
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    pooling: str = "r2"  # set by the experiment
    # GPU only: on CPU it is skipped (recomputation costs time, memory is not short)
    gradient_checkpointing: bool = False
    # LM head only on target positions (same loss, less CPU time: benchmarks/train_logits.py)
    logits_on_targets: bool = True
    # several samples per micro-batch laid end to end in one row (position ids restart per sample, block-
    # diagonal attention): nothing is padded; same loss as the padded batch (tests/test_packing.py)
    pack: bool = False
    fused_adamw: bool = False  # torch's fused AdamW kernel (one launch for all parameters; pays on GPUs)
    new_token_init: str = "zero"  # placeholder rows: "zero" (demo) or "mean" (a pretrained LM, config/smollm2.yaml)
    llm_dtype: str = "auto"  # auto: bf16 weights when the accelerate config says bf16, else fp32
    checkpoint_every: int = 500  # optimizer steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2
    log_every: int = 10
    # "tensorboard": loss, learning rate, validation loss and CA-F1 also go to <out>/tensorboard/ while the
    # run lasts (Accelerate's tracker); train_log.jsonl stays. Set by the workflow's train.log_with.
    log_with: str | None = None
    num_workers: int = 0
    stop_after_steps: int | None = None  # stop (as if interrupted) after N optimizer steps; schedule unchanged
    # which weights the run ends with: the last, or those of the epoch whose generated validation
    # reports score the best clinical F1 (model/selection.py), scored every `select_every` epochs
    select_by: str = "last"
    select_every: int = 1
    select_max_new_tokens: int = 256
    select_batch_size: int = 8

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples as lists), in field order: the `params` of the log and of checkpoints."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def check(self) -> None:
        """Raise TrainConfigError for values the trainer cannot use."""
        if self.select_by not in SELECT_BY:
            raise TrainConfigError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if not isinstance(self.select_every, int) or self.select_every < 1:
            raise TrainConfigError(f"select_every must be a whole number of epochs >= 1, got {self.select_every!r}")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


STAGE_DEFAULTS: dict[int, dict[str, Any]] = {1: {"lr": 1e-4, "batch_size": 4}, 2: {"lr": 2e-5, "batch_size": 1}}

# Settings the workflow takes from elsewhere than train.stage<N>: the experiment's prompt and pooling
# (config `experiments.<name>`) and the tracker (`train.log_with`); the schema's stage sections leave them out.
SET_ELSEWHERE = ("use_mask_tokens", "use_attributes", "pooling", "log_with")

# Settings that change how a run is carried out, not what it computes: a resumed run may change them.
RUNTIME_PARAMS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "stop_after_steps", "log_with",
                  "logits_on_targets")


def stage_defaults(stage: int) -> TrainSettings:
    """The settings of a stage when none is given."""
    return dataclasses.replace(TrainSettings(), **STAGE_DEFAULTS[stage])


def parse_train_settings(stage: int, params: Mapping[str, Any] | str) -> TrainSettings:
    """A stage's settings from the `--params-json` object (or its text); stage defaults fill lr / batch_size.

    Raises TrainConfigError for a non-object, an unknown key (naming the nearest known one) or a bad value.
    """
    given = (json.loads(params) if params else {}) if isinstance(params, str) else params
    if not isinstance(given, Mapping):
        raise TrainConfigError("--params-json must be a JSON object")
    try:
        settings = parse_settings(TrainSettings, given, section=f"train.stage{stage}")
    except SettingsError as e:
        raise TrainConfigError(str(e)) from e
    unset = {k: v for k, v in STAGE_DEFAULTS[stage].items() if getattr(settings, k) is None}
    settings = dataclasses.replace(settings, **unset)
    settings.check()
    return settings
