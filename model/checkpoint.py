"""Checkpoints of a training run: which experiment wrote them, the latest complete one, save and load.

A checkpoint is `<out>/checkpoints/step-<N>/`: Accelerate's state of the trainable tensors (never a
copy of the frozen LM), optimizer, scheduler and RNG streams, plus `trainer_state.json` (step, epoch,
batches done in that epoch, the settings and the experiment's identity). Every process writes into
`step-<N>.tmp`, which the main process renames into place once it is complete, so a `step-<N>`
folder with a `trainer_state.json` is always whole.

A run resumes only from a checkpoint of the same experiment: stage, settings (those that change what is
computed), network, features, LM, stage-1 folder (with a hash of its weights), training volumes and
process count. `check_init` makes the matching check of the stage-1 folder a stage-2 run starts from.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType

from model.network import CONFIG_NAME, WEIGHTS_NAME, MedRegionCTConfig
from model.train_settings import RUNTIME_PARAMS, TrainConfigError
from pipeline.io import atomic_output

STATE_NAME = "trainer_state.json"

# what a stage-1 folder must share with the stage-2 run that starts from it
INIT_MUST_MATCH = ("encoder_hidden", "n_global", "n_region", "connector", "feature_norm", "pooling")


class CheckpointMismatch(TrainConfigError):
    """A checkpoint, or the stage-1 folder a stage-2 run starts from, was written under another experiment."""


# ---- identity ------------------------------------------------------------------------------------


def experiment_identity(*, stage: int, params: dict, network: dict, llm: str, init: str | None,
                        train_ids: Sequence[str], num_processes: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run (JSON-ready, compared key by key).

    `params` is `TrainSettings.to_dict()`, `network` the network config's `to_dict()`.
    """

    def where(path):
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    net = {k: v for k, v in network.items() if k not in ("llm_path", "extra", "llm_hidden")}
    return {
        "stage": stage,
        "params": {k: v for k, v in params.items() if k not in RUNTIME_PARAMS},
        "network": net,
        "features": network.get("extra", {}).get("features", {}),
        "llm": where(llm),
        "init": init_identity(init),
        "train_volumes": hashlib.sha256("\n".join(train_ids).encode()).hexdigest()[:16],
        "num_processes": num_processes,
    }


def init_identity(init: str | None) -> dict | None:
    """The stage-1 folder a stage-2 run starts from, with a hash of its weights (a retrained stage 1
    makes stage-2 checkpoints stale)."""
    if not init:
        return None
    f = Path(init) / WEIGHTS_NAME
    digest = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else None
    return {"path": str(Path(init).resolve()), "weights_sha256": digest}


def identity_diff(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ (one level into dicts)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{k}.{kk}: {a.get(kk)!r} -> {b.get(kk)!r}" for kk in sorted(set(a) | set(b)) if a.get(kk) != b.get(kk)]
        elif a != b:
            out.append(f"{k}: {a!r} -> {b!r}")
    return out


def check_init(init: Path, config: MedRegionCTConfig) -> None:
    """Refuse a stage-1 folder of another experiment (other features, pooling, connector, LM).

    Raises TrainConfigError when `init` is no finished stage-1 run, CheckpointMismatch when it differs.
    """
    f = init / CONFIG_NAME
    if not f.exists():
        raise TrainConfigError(f"--init {init}: no {CONFIG_NAME} (not a finished stage-1 run)")
    saved = json.loads(f.read_text(encoding="utf-8"))
    # a key a folder's (older) config lacks had the field's default when it was trained
    defaults = {x.name: x.default for x in dataclasses.fields(config) if x.default is not dataclasses.MISSING}
    saved = {**defaults, **saved}
    diff = [f"{k}: {saved.get(k)!r} -> {getattr(config, k)!r}" for k in INIT_MUST_MATCH if saved.get(k) != getattr(config, k)]
    a, b = saved.get("extra", {}).get("features", {}), config.extra.get("features", {})
    diff += [f"features.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if saved.get("stage") != 1:
        diff.append(f"stage: {saved.get('stage')!r} (expected a stage-1 folder)")
    if diff:
        raise CheckpointMismatch(
            f"--init {init} was trained under a different experiment config; not loading it. Differences "
            f"(stage 1 -> this run): {'; '.join(diff[:8])}"
        )


# ---- finding, checking ---------------------------------------------------------------------------


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """Highest step-N folder that was renamed into place (a *.tmp folder is an interrupted save)."""
    best, best_step = None, -1
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if (
                p.is_dir()
                and p.name.startswith("step-")
                and p.name[5:].isdigit()
                and (p / STATE_NAME).exists()
            ) and int(p.name[5:]) > best_step:
                best, best_step = p, int(p.name[5:])
    return best


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json: step, epoch, batches_done, params, experiment."""
    return json.loads((ckpt / STATE_NAME).read_text(encoding="utf-8"))


def mismatch_reason(ckpt: Path, identity: dict) -> str | None:
    """Why `ckpt` cannot be resumed by the experiment `identity` (None: it can)."""
    saved = read_state(ckpt).get("experiment")
    diff = ["no experiment record (written by an older trainer)"] if saved is None else identity_diff(saved, identity)
    if not diff:
        return None
    return (f"{ckpt} was written by a different experiment config; not loading it. Differences "
            f"(checkpoint -> this run): {'; '.join(diff[:8])}")


# ---- saving, loading (every process calls these) -------------------------------------------------


def _is_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def keep_trainable(models, weights, output_dir) -> None:
    """Accelerate save_state pre-hook: checkpoints hold the trainable tensors only, never the frozen LM."""
    for i, m in enumerate(models):
        names = {n for n, x in m.named_parameters() if x.requires_grad}
        weights[i] = {k: v for k, v in weights[i].items() if k in names}


def save_checkpoint(accelerator: Accelerator, ckpt_dir: Path, step: int, state: dict[str, Any], keep: int) -> None:
    """Write `<ckpt_dir>/step-<step>` (Accelerate state + `state` as trainer_state.json), keeping the
    `keep` newest checkpoints (0: all). Called by every process; the main process renames and prunes."""
    final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
    is_main = accelerator.is_main_process
    # the temporary name is the same in every process (they all write into it); only the main one
    # enters atomic_output, which removes a leftover, and renames it once the others are done
    with atomic_output(final, temporary=tmp) if is_main else contextlib.nullcontext(tmp) as folder:
        accelerator.wait_for_everyone()
        kw = {"exclude_frozen_parameters": True} if _is_deepspeed(accelerator) else {}
        accelerator.save_state(str(folder), **kw)
        accelerator.wait_for_everyone()
        if is_main:
            (folder / STATE_NAME).write_text(json.dumps(state, indent=2), encoding="utf-8")
    if is_main:
        done = sorted((c for c in ckpt_dir.glob("step-*") if c.name[5:].isdigit()), key=lambda c: int(c.name[5:]))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, ckpt: Path) -> dict[str, Any]:
    """Load `ckpt`'s Accelerate state into the prepared objects; its trainer_state.json."""
    kw = {"load_module_strict": False} if _is_deepspeed(accelerator) else {"strict": False}
    accelerator.load_state(str(ckpt), **kw)
    return read_state(ckpt)


def remove_checkpoints(accelerator: Accelerator, ckpt_dir: Path) -> None:
    """Remove every checkpoint (a restart after a mismatch); called by every process."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    accelerator.wait_for_everyone()
