"""Train MedRegion-CT, one stage per run (MedRegion-CT (the paper), Sec. 2 "Training").

    accelerate launch --config_file config/accelerate/cpu.yaml -m model.train \\
        --stage 1 --params-json '{"epochs": 3}' \\
        --features results/features/enc/shard-*.zarr --attributes results/attributes/shard-*.parquet \\
        --train-reports results/reports/train.parquet --val-reports results/reports/validation.parquet \\
        --llm path/to/llm --out results/experiments/full/stage1

Stage 1 trains the connector on full findings (LM frozen); stage 2 (`--init <stage1 out>`) trains
connector + mask extractor + LoRA on the structured 6-region target. Single process works with plain
`python -m model.train`; the workflow starts it through `python -m model.launch` (torchrun for several
CPU processes, `accelerate launch` otherwise). `--resume` continues from the latest complete checkpoint
in <out>/checkpoints; a checkpoint written under a different experiment (stage, parameters, network,
LM, stage-1 folder, training volumes, process count) is refused (`--on-mismatch fail`, the default) or
set aside and training starts over (`--on-mismatch restart`, what the rule uses: a changed config
reruns the rule). The run's result is <out>/medregion_config.json (written last by save_pretrained).
With `select_by: val_ca_f1` it holds the weights of the epoch whose generated validation reports scored
the best clinical F1 (model/selection.py), not the last ones.

The parameters (`--params-json`) are model/train_settings.py's TrainSettings; checkpoints and the
experiment identity they are resumed under are model/checkpoint.py; train_log.jsonl and loss.png are
model/train_log.py.
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from transformers import get_cosine_schedule_with_warmup

from model import checkpoint
from model.checkpoint import (
    INIT_MUST_MATCH,
    CheckpointMismatch,
    experiment_identity,
    identity_diff,
    latest_checkpoint,
)
from model.data import Collator, LengthGroupedBatchSampler, ReportDataset, build_dataset
from model.generate import generate_texts
from model.network import WEIGHTS_NAME, MedRegionCT, MedRegionCTConfig
from model.selection import BestWeights, macro_ca_f1, reference_texts, report_text
from model.train_log import TrainLog, plot_loss, read_log, tracker_values
from model.train_settings import (
    RUNTIME_PARAMS,
    STAGE_DEFAULTS,
    TrainConfigError,
    TrainSettings,
    parse_train_settings,
)
from pipeline.feature_store import FeatureStore
from pipeline.progress import progress
from pipeline.skipped import skipped_volumes

# model.train's names from before the split into train_settings / checkpoint / train_log stay importable here
__all__ = [
    "DEFAULTS", "INIT_MUST_MATCH", "RUNTIME_PARAMS", "STAGE_DEFAULTS", "CheckpointMismatch", "TrainConfigError",
    "TrainSettings", "Trainer", "check_init", "experiment_identity", "identity_diff", "latest_checkpoint", "main",
    "network_config", "parse_args", "parse_train_settings", "plot_loss", "read_log", "resolve_params", "tracker_values",
]

# the settings without the stage defaults (lr and batch_size None), as a dict: what benchmarks/ and the
# config tests compare key names with
DEFAULTS: dict[str, Any] = TrainSettings().to_dict()


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m model.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True,
                    help="1: connector on the full findings (LM frozen); 2: connector, mask extractor and LoRA "
                         "on the structured 6-region report")
    ap.add_argument("--params-json", default="{}",
                    help="JSON object of training parameters (model/train_settings.py TrainSettings; the "
                         "workflow passes train.stage<N> with the experiment's settings)")
    ap.add_argument("--features", nargs="+", required=True, help="feature shards (*.zarr)")
    ap.add_argument("--attributes", nargs="*", default=[], help="attribute parquet(s) with volume_id, prompt")
    ap.add_argument("--train-reports", required=True, help="reports parquet of the training split")
    ap.add_argument("--val-reports", required=True,
                    help="reports parquet of the validation split (validation loss, and selection by clinical F1)")
    ap.add_argument("--skipped-qc", nargs="*", default=[],
                    help="QC tables of the data stages: the volumes they skipped are left out (pipeline.skipped)")
    ap.add_argument("--llm", required=True, help="base causal LM folder (or hub id)")
    ap.add_argument("--init", default=None, help="stage-1 output folder whose connector starts stage 2")
    ap.add_argument("--out", required=True,
                    help="output folder: medregion_config.json and weights, train_log.jsonl, loss.png, checkpoints/")
    ap.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    ap.add_argument(
        "--on-mismatch",
        choices=("fail", "restart"),
        default="fail",
        help="a checkpoint of a different experiment config: refuse (fail) or remove it and start over",
    )
    return ap.parse_args(argv)


def network_config(store: FeatureStore, settings: TrainSettings | Mapping[str, Any], llm: str,
                   stage: int) -> MedRegionCTConfig:
    """The network's config from the feature cache's shapes and the training settings (a TrainSettings,
    or its dict as `resolve_params` gives it)."""
    s = settings if isinstance(settings, TrainSettings) else TrainSettings(**settings)
    probe = store[store.volume_ids[0]]
    return MedRegionCTConfig(
        llm_path=llm,
        encoder_hidden=int(probe["global"].shape[-1]),
        n_global=int(probe["global"].shape[0]),
        n_region=int(probe["region"].shape[0]),
        n_masks=int(probe["mask_pooled"].shape[0]),
        levels=int(probe["mask_pooled"].shape[1]),
        mask_grid=tuple(int(n) for n in probe["mask_grid"].shape[1:]),
        connector=s.connector,
        feature_norm=s.feature_norm,
        mask_hidden=s.mask_hidden,
        use_mask_tokens=s.use_mask_tokens,
        use_attributes=s.use_attributes,
        pooling=s.pooling,
        stage=stage,
        lora_r=s.lora_r,
        lora_alpha=s.lora_alpha,
        lora_dropout=s.lora_dropout,
        lora_targets=tuple(s.lora_targets),
        max_length=s.max_length,
        new_token_init=s.new_token_init,
        extra={"features": {k: v for k, v in store.attrs.items() if isinstance(v, (str, int, float, bool))}},
    )


class Trainer:
    """One training stage, read top to bottom as `run` does it.

    `__init__` sets up (accelerator and seed, network, data, optimizer); `resume` continues from the latest
    checkpoint of the same experiment; `train` runs the epochs (`train_epoch` -> `train_step` per
    micro-batch, `validate` after each epoch, which also offers the weights to the selection); `finish`
    keeps the selected (or last) weights and writes the output folder. Every process runs all of it; the
    main process alone writes the log, the selection and the output folder.
    """

    def __init__(self, args: argparse.Namespace, settings: TrainSettings):
        self.args, self.s, self.stage = args, settings, args.stage
        self.out = Path(args.out)
        self.set_up_accelerator()
        self.build_model()
        self.build_data()
        self.build_optimizer()
        self.identity = experiment_identity(
            stage=self.stage, params=self.s.to_dict(), network=self.config.to_dict(), llm=args.llm, init=args.init,
            train_ids=self.train_ds.volume_ids, num_processes=self.accelerator.num_processes,
        )

    def run(self) -> None:
        """Resume (or start), train, finish."""
        self.resume()
        if self.s.log_with:
            self.accelerator.init_trackers("tensorboard", config={k: v for k, v in self.s.to_dict().items()
                                                                  if isinstance(v, (int, float, str, bool))})
        self.log_start()
        stopped = self.train()
        self.finish(stopped)

    # ---- set up ----------------------------------------------------------------------------------

    def set_up_accelerator(self) -> None:
        """Accelerator (one per process), the seed, the output folder and its log."""
        s = self.s
        # without a GPU, say cpu=True: otherwise `torchrun --nproc_per_node N` on CPU gives N unrelated
        # single-process runs instead of N gloo ranks
        self.accelerator = Accelerator(gradient_accumulation_steps=s.grad_accum, cpu=not torch.cuda.is_available(),
                                       log_with=s.log_with or None, project_dir=str(self.out))
        self.is_main = self.accelerator.is_main_process
        self.ranks = gather_object([{"rank": self.accelerator.process_index, "pid": os.getpid(),
                                     "host": socket.gethostname()}])
        set_seed(s.seed)
        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            # our loaders use a batch sampler, so DeepSpeed cannot infer the micro-batch
            self.accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = s.batch_size
        self.out.mkdir(parents=True, exist_ok=True)
        self.ckpt_dir = self.out / "checkpoints"
        self.log = TrainLog(self.out / "train_log.jsonl", self.accelerator, tracking=bool(s.log_with))

    def build_model(self) -> None:
        """The network from the feature cache's shapes; stage 2 starts from stage 1's connector."""
        s, args = self.s, self.args
        self.store = FeatureStore(args.features)
        self.config = network_config(self.store, s, args.llm, self.stage)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}[s.llm_dtype]
        if dtype is None:
            dtype = torch.bfloat16 if self.accelerator.mixed_precision == "bf16" else torch.float32
        model = MedRegionCT.from_config(self.config, dtype=dtype)
        if args.init:
            checkpoint.check_init(Path(args.init), self.config)
            if not model.load_own_weights(Path(args.init) / WEIGHTS_NAME, strict=False, prefixes=("connector.",)):
                raise TrainConfigError(f"{args.init}: no connector weights in {WEIGHTS_NAME}")
        model.logits_on_targets = bool(s.logits_on_targets)
        if s.gradient_checkpointing and self.accelerator.device.type == "cpu":
            self.accelerator.print("gradient_checkpointing skipped on CPU: recomputing activations costs time, "
                                   "memory is not short")
        elif s.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        self.n_train = sum(x.numel() for x in model.parameters() if x.requires_grad)
        self.n_all = sum(x.numel() for x in model.parameters())
        self.model = model

    def dataset(self, reports: str, with_targets: bool = True) -> ReportDataset:
        """Prompts (and, `with_targets`, the stage's target) of the volumes in `reports`."""
        return build_dataset(
            self.args.features, self.args.attributes, reports, self.model.tokenizer,
            stage=self.stage,
            use_mask_tokens=self.config.prompt_uses_masks,
            use_attributes=self.config.prompt_uses_attributes,
            n_vision=self.config.n_vision,
            max_length=self.s.max_length,
            with_targets=with_targets,
            store=self.store,
            skipped=self.skipped,
        )

    def build_data(self) -> None:
        """Datasets, feature norms fitted on the training split, length-grouped loaders."""
        s, args = self.s, self.args
        self.skipped = skipped_volumes(args.skipped_qc).ids  # on_error: skip; any other missing volume is an error
        self.train_ds, self.val_ds = self.dataset(args.train_reports), self.dataset(args.val_reports)
        self.selecting = s.select_by == "val_ca_f1"
        if self.selecting:  # the validation prompts without their targets, and the findings they are scored on
            self.val_prompts = self.dataset(args.val_reports, with_targets=False)
            self.val_references = reference_texts(args.val_reports, self.val_prompts.volume_ids)
        self.best = BestWeights(self.out / "selection") if self.is_main else None  # only the main process keeps it
        self.fitted = self.model.fit_feature_norms(self.train_ds[i] for i in range(len(self.train_ds)))
        collate = Collator(self.model.tokenizer.pad_token_id, padding_side="right", pack=bool(s.pack))
        self.train_sampler = LengthGroupedBatchSampler(self.train_ds.lengths, s.batch_size, seed=s.seed)
        val_sampler = LengthGroupedBatchSampler(self.val_ds.lengths, s.batch_size, shuffle=False)
        # own generators: creating a loader iterator then draws from them, not from the global RNG stream,
        # so a resumed run (which creates a different number of iterators) replays the same dropout masks
        loader_kw = {"collate_fn": collate, "num_workers": s.num_workers}
        self.train_loader = torch.utils.data.DataLoader(
            self.train_ds, batch_sampler=self.train_sampler, generator=torch.Generator().manual_seed(s.seed), **loader_kw
        )
        self.val_loader = torch.utils.data.DataLoader(
            self.val_ds, batch_sampler=val_sampler, generator=torch.Generator().manual_seed(s.seed + 1), **loader_kw
        )

    def build_optimizer(self) -> None:
        """AdamW on the trainable tensors, cosine schedule with warm-up; everything prepared by Accelerate."""
        s, acc = self.s, self.accelerator
        trainable = [(n, x) for n, x in self.model.named_parameters() if x.requires_grad]
        self.trainable = [x for _, x in trainable]
        groups = [
            {"params": [x for n, x in trainable if x.ndim >= 2], "weight_decay": s.weight_decay},
            {"params": [x for n, x in trainable if x.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, fused=bool(s.fused_adamw) or None)
        # each process sees ceil(batches / processes) batches; Accelerate steps a prepared scheduler once per
        # process per optimizer step, so the schedule is laid out in process-steps
        batches_per_process = math.ceil(len(self.train_sampler) / acc.num_processes)
        self.steps_per_epoch = math.ceil(batches_per_process / s.grad_accum)
        self.total_steps = self.steps_per_epoch * s.epochs
        nproc = acc.num_processes
        scheduler = get_cosine_schedule_with_warmup(
            optimizer, int(s.warmup_ratio * self.total_steps) * nproc, self.total_steps * nproc
        )
        self.model, self.optimizer, self.train_loader, self.val_loader, self.scheduler = acc.prepare(
            self.model, optimizer, self.train_loader, self.val_loader, scheduler
        )
        if len(self.train_loader) != batches_per_process:
            raise RuntimeError(f"expected {batches_per_process} batches per process, loader has {len(self.train_loader)}")
        acc.register_save_state_pre_hook(checkpoint.keep_trainable)

    # ---- resume ----------------------------------------------------------------------------------

    def resume(self) -> None:
        """With --resume, continue from the latest checkpoint of this experiment; otherwise start afresh.

        A checkpoint of another experiment raises CheckpointMismatch (--on-mismatch fail) or is removed
        (--on-mismatch restart). A resumed run drops the log lines of work after its checkpoint.
        """
        self.global_step, self.start_epoch, self.skip_batches, self.resumed_after_epoch_end = 0, 0, 0, False
        ckpt = latest_checkpoint(self.ckpt_dir) if self.args.resume else None
        why = checkpoint.mismatch_reason(ckpt, self.identity) if ckpt is not None else None
        if why:
            if self.args.on_mismatch == "fail":
                raise CheckpointMismatch(why + f". Remove {self.ckpt_dir} or pass --on-mismatch restart to start over.")
            self.accelerator.print(why + f". --on-mismatch restart: removing {self.ckpt_dir}, starting over.")
            checkpoint.remove_checkpoints(self.accelerator, self.ckpt_dir)
            ckpt = None
        if ckpt is None:
            if self.is_main:  # a fresh start forgets what an earlier run selected and logged
                self.best.clear()
                self.log.remove()
            return
        state = checkpoint.load_checkpoint(self.accelerator, ckpt)
        self.global_step, self.start_epoch, self.skip_batches = state["step"], state["epoch"], state["batches_done"]
        if self.skip_batches >= len(self.train_loader):
            self.start_epoch, self.skip_batches, self.resumed_after_epoch_end = self.start_epoch + 1, 0, True
        if self.is_main:  # the work after the checkpoint is done again
            self.log.keep_until(self.global_step)

    def log_start(self) -> None:
        """The `start` (or `resume`) record: sizes, schedule, processes, what the data stages left out."""
        tr, va, acc = self.train_ds, self.val_ds, self.accelerator
        self.log.write(
            {
                "event": "resume" if self.global_step else "start",
                "step": self.global_step,
                "stage": self.stage,
                "trainable_params": self.n_train,
                "feature_norms_fitted": self.fitted,
                "total_params": self.n_all,
                "train_volumes": len(tr),
                "val_volumes": len(va),
                "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps,
                "num_processes": acc.num_processes,
                "ranks": self.ranks,
                "mixed_precision": acc.mixed_precision,
                "truncated_targets": tr.n_truncated + va.n_truncated,
                "truncated_volumes": (tr.truncated_ids + va.truncated_ids)[:20],
                "empty_targets_dropped": tr.n_empty_targets + va.n_empty_targets,
                "empty_target_volumes": (tr.empty_target_ids + va.empty_target_ids)[:20],
                "skipped_volumes": sorted(tr.skipped_ids + va.skipped_ids),  # by a data stage (QC tables)
                "params": self.s.to_dict(),
            }
        )
        if self.is_main and tr.n_truncated + va.n_truncated:
            print(f"{tr.n_truncated + va.n_truncated} target(s) cut at max_length={self.s.max_length}", file=sys.stderr)
        if self.is_main and tr.n_empty_targets + va.n_empty_targets:
            print(f"{tr.n_empty_targets + va.n_empty_targets} report(s) with an empty target left out", file=sys.stderr)

    # ---- train -----------------------------------------------------------------------------------

    def train(self) -> bool:
        """The epochs from where the run starts, each followed by `validate`; True if stop_after_steps hit."""
        acc = self.accelerator
        self.bar = progress(total=self.total_steps, initial=self.global_step, disable=not self.is_main,
                            desc=f"stage {self.stage}")
        self.t0 = time.time()
        self.run_loss = torch.zeros((), device=acc.device)  # summed on device: no sync per micro-batch
        self.run_n = 0
        # throughput of the loop itself (forward, backward, step, data, logging); validation and
        # checkpoint writes are timed apart (side_s)
        self.tokens = torch.zeros((), dtype=torch.long, device=acc.device)
        self.side_s = 0.0
        self.model.train()
        if self.resumed_after_epoch_end and not any(
            "val_loss" in r and r.get("epoch") == self.start_epoch for r in self.log.records()
        ):  # killed between the epoch's last checkpoint and its validation
            self.validate(self.start_epoch)
        stopped = False
        for epoch in range(self.start_epoch, self.s.epochs):
            stopped = self.train_epoch(epoch)
            if stopped:
                break
            self.validate(epoch + 1)
        self.bar.close()
        self.loop_s = time.time() - self.t0 - self.side_s
        self.all_tokens = int(acc.reduce(self.tokens, "sum").item())
        return stopped

    def train_epoch(self, epoch: int) -> bool:
        """One pass over this process's share of the training batches (the rest of it, when resumed
        mid-epoch): log, checkpoint and stop at optimizer-step boundaries. True if stop_after_steps hit."""
        s = self.s
        self.train_sampler.set_epoch(epoch)
        self.train_loader.set_epoch(epoch)
        loader, first = self.train_loader, 0
        if epoch == self.start_epoch and self.skip_batches:
            loader, first = self.accelerator.skip_first_batches(self.train_loader, self.skip_batches), self.skip_batches
            loader.set_epoch(epoch)
        for bi, batch in enumerate(loader, start=first):
            if not self.train_step(batch):
                continue  # accumulating gradients
            self.global_step += 1
            self.bar.update(1)
            if self.global_step % s.log_every == 0 or self.global_step == self.total_steps:
                self.log_loss(epoch + (bi + 1) / len(self.train_loader))
            if s.checkpoint_every and self.global_step % s.checkpoint_every == 0:
                self.save(epoch, batches_done=bi + 1)
            if s.stop_after_steps and self.global_step >= s.stop_after_steps:
                return True
        return False

    def train_step(self, batch: dict[str, Any]) -> bool:
        """Forward and backward one micro-batch; True when it completed an optimizer step.

        batch: input_ids, attention_mask, labels (B, T) (packed: B = 1, plus position_ids (1, T)); vision
        (B, n_vision, C); with mask tokens mask_pooled (B, n_masks, levels, C) and mask_grid
        (B, n_masks, D, H, W). The loss is the mean cross-entropy over the target tokens.
        """
        acc = self.accelerator
        with acc.accumulate(self.model):
            loss = self.model(**batch).loss
            acc.backward(loss)
            if acc.sync_gradients and self.s.max_grad_norm:
                acc.clip_grad_norm_(self.trainable, self.s.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.run_loss += loss.detach().float()
        self.run_n += 1
        self.tokens += batch["attention_mask"].sum()
        return acc.sync_gradients

    def log_loss(self, epoch: float) -> None:
        """A step record: the mean loss of the micro-batches since the last one (over all processes)."""
        mean = self.accelerator.reduce(self.run_loss / self.run_n, "mean").item()
        self.log.write({"step": self.global_step, "epoch": epoch, "loss": mean,
                        "lr": self.scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - self.t0, 2)})
        self.bar.set_postfix(loss=f"{mean:.3f}")
        self.run_loss.zero_()
        self.run_n = 0

    def save(self, epoch: int, batches_done: int) -> None:
        """Checkpoint after `batches_done` batches of `epoch` (every process)."""
        t = time.time()
        state = {"step": self.global_step, "epoch": epoch, "batches_done": batches_done, "params": self.s.to_dict(),
                 "experiment": self.identity}
        checkpoint.save_checkpoint(self.accelerator, self.ckpt_dir, self.global_step, state, self.s.keep_checkpoints)
        self.side_s += time.time() - t

    # ---- validate, select ------------------------------------------------------------------------

    def validate(self, epoch_done: int) -> None:
        """The epoch record: validation loss and, when selecting on a scoring epoch, the validation
        clinical F1, offering the weights to the selection."""
        t = time.time()
        record = {"step": self.global_step, "epoch": epoch_done, "val_loss": self.val_loss()}
        msg = f"epoch {epoch_done}: validation loss {record['val_loss']:.4f}"
        if self.selecting and (epoch_done % self.s.select_every == 0 or epoch_done == self.s.epochs):
            score, per_class = self.val_ca_f1()
            kept = self.is_main and self.best.offer(
                score, self.accelerator.unwrap_model(self.model).trainable_state_dict(),
                step=self.global_step, epoch=epoch_done,
            )
            record.update(val_ca_f1=score, val_ca_f1_per_class=per_class, selected=kept)
            msg += f", clinical F1 {'n/a' if score is None else f'{score:.3f}'}{' (best so far)' if kept else ''}"
        self.side_s += time.time() - t
        self.log.write(record)  # after the selection: a run killed before this line scores the epoch again
        if self.is_main:
            self.bar.write(msg)

    def _rng_devices(self) -> list[torch.device]:
        return [self.accelerator.device] if self.accelerator.device.type == "cuda" else []

    @torch.no_grad()
    def val_loss(self) -> float:
        """Mean cross-entropy over all validation target tokens (every process's batches)."""
        acc = self.accelerator
        # validation must not move the training RNG stream (a resumed run skips it), so fork it
        with torch.random.fork_rng(devices=self._rng_devices()):
            self.model.eval()
            total, count = torch.zeros((), device=acc.device), torch.zeros((), device=acc.device)
            for batch in self.val_loader:
                loss = self.model(**batch).loss
                n = (batch["labels"][:, 1:] != -100).sum()
                total += loss.float() * n
                count += n
            total, count = acc.reduce(total, "sum"), acc.reduce(count, "sum")
            self.model.train()
            return (total / count.clamp(min=1)).item()

    @torch.no_grad()
    def val_ca_f1(self) -> tuple[float | None, dict]:
        """Generate the validation reports (split over the processes) and score them (model/selection.py)."""
        acc = self.accelerator
        net = acc.unwrap_model(self.model)
        net.eval()
        with torch.random.fork_rng(devices=self._rng_devices()):
            mine = range(acc.process_index, len(self.val_prompts), acc.num_processes)
            raw = generate_texts(
                net, self.val_prompts, mine, batch_size=self.s.select_batch_size,
                max_new_tokens=self.s.select_max_new_tokens,
                autocast_dtype=torch.bfloat16 if acc.mixed_precision == "bf16" else None,
            )
        net.train()
        texts = {vid: t for part in gather_object([raw]) for vid, t in part.items()}
        reports = [report_text(texts[vid], self.stage) for vid in self.val_prompts.volume_ids]
        return macro_ca_f1(self.val_references, reports)

    # ---- finish ----------------------------------------------------------------------------------

    def finish(self, stopped: bool) -> None:
        """loss.png, the `stopped` or `done` record; when done, the selected weights and the output folder."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if self.is_main:
            plot_loss(self.log.path, self.out / "loss.png")
        if stopped:
            self.log.write({"event": "stopped", "step": self.global_step})
            return
        self.log.write(
            {
                "event": "done",
                "step": self.global_step,
                "elapsed_s": round(time.time() - self.t0, 2),
                "loop_s": round(self.loop_s, 3),
                "train_tokens": self.all_tokens,
                "tokens_per_s": round(self.all_tokens / max(self.loop_s, 1e-9), 1),
            }
        )
        if self.is_main and self.selecting:
            self.load_selected()
        if self.is_main:
            acc.unwrap_model(self.model).save_pretrained(self.out)
            self.best.clear()  # its weights are now the folder's
        acc.wait_for_everyone()
        acc.end_training()

    def load_selected(self) -> None:
        """Put the selected epoch's weights into the network (main process); the last ones if none scored."""
        net = self.accelerator.unwrap_model(self.model)
        if self.best.record is None:
            print("select_by val_ca_f1: no validation reference names a class, keeping the last weights",
                  file=sys.stderr)
            self.log.write({"event": "selected", "step": self.global_step, "val_ca_f1": None, "reason": "no scored epoch"})
            return
        state = self.best.state()
        if set(state) != set(net.trainable_state_dict()):
            raise RuntimeError(f"{self.best.folder}: selected weights do not match the network's trainable tensors")
        net.load_state_dict(state, strict=False)
        r = self.best.record
        self.log.write({"event": "selected", "step": r["step"], "epoch": r["epoch"], "val_ca_f1": r["score"]})


# ---- the names scripts and tests use, exiting as the CLI does --------------------------------------


def resolve_params(stage: int, params_json: str) -> dict[str, Any]:
    """The stage's settings as the dict the log records (for benchmarks/ scripts that build a model as
    the trainer does); bad settings raise TrainConfigError."""
    return parse_train_settings(stage, params_json).to_dict()


check_init = checkpoint.check_init  # the stage-1 folder's config must match stage 2's (TrainConfigError)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        Trainer(args, parse_train_settings(args.stage, args.params_json)).run()
    except TrainConfigError as e:  # bad settings, a stage-1 folder or checkpoint of another experiment
        raise SystemExit(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
