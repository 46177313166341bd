"""Train MedRegion-CT, one stage per run (paper Sec. 2 "Training").

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
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch

DEFAULTS = {
    "epochs": 3,
    "lr": None,  # stage 1: 1e-4, stage 2: 2e-5 (paper)
    "batch_size": None,  # stage 1: 4, stage 2: 1 (paper: 4 x 8 and 1 x 8)
    "grad_accum": 8,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 2048,
    "seed": 0,
    "use_mask_tokens": True,
    "use_attributes": True,
    "connector": "linear",
    "feature_norm": False,
    "mask_hidden": 1024,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.1,
    "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "pooling": "r2",
    "gradient_checkpointing": False,  # GPU only: on CPU it is skipped (recomputation costs time, memory is not short)
    "logits_on_targets": True,  # LM head only on target positions (same loss, less CPU time: benchmarks/train_logits.py)
    # several samples per micro-batch laid end to end in one row (position ids restart per sample, block-
    # diagonal attention): nothing is padded; same loss as the padded batch (tests/test_packing.py)
    "pack": False,
    "fused_adamw": False,  # torch's fused AdamW kernel (one launch for all parameters; pays on GPUs)
    "new_token_init": "zero",  # placeholder rows: "zero" (demo) or "mean" (a pretrained LM, config/smollm2.yaml)
    "llm_dtype": "auto",  # auto: bf16 weights when the accelerate config says bf16, else fp32
    "checkpoint_every": 500,  # optimizer steps; 0 = no intermediate checkpoints
    "keep_checkpoints": 2,
    "log_every": 10,
    # "tensorboard": loss, learning rate, validation loss and CA-F1 also go to <out>/tensorboard/ while the
    # run lasts (Accelerate's tracker; `tensorboard --logdir results/experiments`); train_log.jsonl stays
    "log_with": None,
    "num_workers": 0,
    "stop_after_steps": None,  # stop (as if interrupted) after N optimizer steps; schedule unchanged
    # which weights the run ends with: the last, or those of the epoch whose generated validation
    # reports score the best clinical F1 (model/selection.py), scored every `select_every` epochs
    "select_by": "last",
    "select_every": 1,
    "select_max_new_tokens": 256,
    "select_batch_size": 8,
}
STAGE_DEFAULTS = {1: {"lr": 1e-4, "batch_size": 4}, 2: {"lr": 2e-5, "batch_size": 1}}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", type=int, choices=(1, 2), required=True)
    ap.add_argument("--params-json", default="{}", help="JSON object of training parameters (see DEFAULTS)")
    ap.add_argument("--features", nargs="+", required=True, help="feature shards (*.zarr)")
    ap.add_argument("--attributes", nargs="*", default=[], help="attribute parquet(s) with volume_id, prompt")
    ap.add_argument("--train-reports", required=True)
    ap.add_argument("--val-reports", required=True)
    ap.add_argument("--skipped-qc", nargs="*", default=[],
                    help="QC tables of the data stages: the volumes they skipped are left out (pipeline.skipped)")
    ap.add_argument("--llm", required=True, help="base causal LM folder (or hub id)")
    ap.add_argument("--init", default=None, help="stage-1 output folder whose connector starts stage 2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    ap.add_argument(
        "--on-mismatch",
        choices=("fail", "restart"),
        default="fail",
        help="a checkpoint of a different experiment config: refuse (fail) or remove it and start over",
    )
    return ap.parse_args(argv)


# Parameters that change how a run is carried out, not what it computes: a resumed run may change them.
RUNTIME_PARAMS = ("log_every", "checkpoint_every", "keep_checkpoints", "num_workers", "stop_after_steps", "log_with",
                  "logits_on_targets")


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


def experiment_identity(params: dict, network: dict, args, train_ids: list[str], num_processes: int) -> dict:
    """What a checkpoint must agree on to be resumed by this run (JSON-ready, compared key by key)."""

    def where(path):
        return str(Path(path).resolve()) if path and Path(path).exists() else path

    net = {k: v for k, v in network.items() if k not in ("llm_path", "extra", "llm_hidden")}
    return {
        "stage": args.stage,
        "params": {k: v for k, v in params.items() if k not in RUNTIME_PARAMS},
        "network": net,
        "features": network.get("extra", {}).get("features", {}),
        "llm": where(args.llm),
        "init": _init_identity(args.init),
        "train_volumes": hashlib.sha256("\n".join(train_ids).encode()).hexdigest()[:16],
        "num_processes": num_processes,
    }


def _init_identity(init) -> dict | None:
    """The stage-1 folder a stage-2 run starts from, with a hash of its weights (a retrained stage 1
    makes stage-2 checkpoints stale)."""
    if not init:
        return None
    from model.network import WEIGHTS_NAME

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


def resolve_params(stage: int, params_json: str) -> dict:
    given = json.loads(params_json) if params_json else {}
    if not isinstance(given, dict):
        raise SystemExit("--params-json must be a JSON object")
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"unknown training parameter(s): {unknown}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **given}
    for k, v in STAGE_DEFAULTS[stage].items():
        if params[k] is None:
            params[k] = v
    from model.selection import SELECT_BY

    if params["select_by"] not in SELECT_BY:
        raise SystemExit(f"select_by must be one of {SELECT_BY}, got {params['select_by']!r}")
    if not isinstance(params["select_every"], int) or params["select_every"] < 1:
        raise SystemExit(f"select_every must be a whole number of epochs >= 1, got {params['select_every']!r}")
    return params


def network_config(store, p: dict, llm: str, stage: int):
    """The network's config from the feature cache's shapes and the training parameters."""
    from model.network import MedRegionCTConfig

    probe = store[store.volume_ids[0]]
    return MedRegionCTConfig(
        llm_path=llm,
        encoder_hidden=int(probe["global"].shape[-1]),
        n_global=int(probe["global"].shape[0]),
        n_region=int(probe["region"].shape[0]),
        n_masks=int(probe["mask_pooled"].shape[0]),
        levels=int(probe["mask_pooled"].shape[1]),
        mask_grid=tuple(int(s) for s in probe["mask_grid"].shape[1:]),
        connector=p["connector"],
        feature_norm=p["feature_norm"],
        mask_hidden=p["mask_hidden"],
        use_mask_tokens=p["use_mask_tokens"],
        use_attributes=p["use_attributes"],
        pooling=p["pooling"],
        stage=stage,
        lora_r=p["lora_r"],
        lora_alpha=p["lora_alpha"],
        lora_dropout=p["lora_dropout"],
        lora_targets=tuple(p["lora_targets"]),
        max_length=p["max_length"],
        new_token_init=p["new_token_init"],
        extra={"features": {k: v for k, v in store.attrs.items() if isinstance(v, (str, int, float, bool))}},
    )


# what a stage-1 folder must share with the stage-2 run that starts from it
INIT_MUST_MATCH = ("encoder_hidden", "n_global", "n_region", "connector", "feature_norm", "pooling")


def check_init(init: Path, config) -> None:
    """Refuse a stage-1 folder of another experiment (other features, pooling, connector, LM)."""
    from model.network import CONFIG_NAME

    f = init / CONFIG_NAME
    if not f.exists():
        raise SystemExit(f"--init {init}: no {CONFIG_NAME} (not a finished stage-1 run)")
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
        raise SystemExit(
            f"--init {init} was trained under a different experiment config; not loading it. Differences "
            f"(stage 1 -> this run): {'; '.join(diff[:8])}"
        )


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """Highest step-N folder that was renamed into place (a *.tmp folder is an interrupted save)."""
    best, best_step = None, -1
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if (
                p.is_dir()
                and p.name.startswith("step-")
                and p.name[5:].isdigit()
                and (p / "trainer_state.json").exists()
            ) and int(p.name[5:]) > best_step:
                best, best_step = p, int(p.name[5:])
    return best


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(log_path: Path, png_path: Path) -> None:
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
    tmp = png_path.with_name(png_path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)


def main(argv=None) -> int:
    args = parse_args(argv)
    p = resolve_params(args.stage, args.params_json)
    out = Path(args.out)

    # ---- accelerator, seed -------------------------------------------------------------------
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from model.data import Collator, LengthGroupedBatchSampler, build_dataset
    from model.generate import generate_texts
    from model.network import WEIGHTS_NAME, MedRegionCT
    from model.selection import BestWeights, macro_ca_f1, reference_texts, report_text
    from pipeline.feature_store import FeatureStore

    # without a GPU, say cpu=True: otherwise `torchrun --nproc_per_node N` on CPU gives N unrelated
    # single-process runs instead of N gloo ranks
    accelerator = Accelerator(gradient_accumulation_steps=p["grad_accum"], cpu=not torch.cuda.is_available(),
                              log_with=p["log_with"] or None, project_dir=str(out))
    is_main = accelerator.is_main_process
    from accelerate.utils import gather_object

    ranks = gather_object([{"rank": accelerator.process_index, "pid": os.getpid(), "host": socket.gethostname()}])
    set_seed(p["seed"])
    is_deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if is_deepspeed:  # our loaders use a batch sampler, so DeepSpeed cannot infer the micro-batch
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = p[
            "batch_size"
        ]
    out.mkdir(parents=True, exist_ok=True)
    log_path, ckpt_dir = out / "train_log.jsonl", out / "checkpoints"

    # ---- model -------------------------------------------------------------------------------
    store = FeatureStore(args.features)
    config = network_config(store, p, args.llm, args.stage)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}[p["llm_dtype"]]
    if dtype is None:
        dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    model = MedRegionCT.from_config(config, dtype=dtype)
    if args.init:  # stage 2 starts from stage 1's connector
        check_init(Path(args.init), config)
        loaded = model.load_own_weights(
            Path(args.init) / WEIGHTS_NAME, strict=False, prefixes=("connector.",)
        )
        if not loaded:
            raise SystemExit(f"{args.init}: no connector weights in {WEIGHTS_NAME}")
    model.logits_on_targets = bool(p["logits_on_targets"])
    if p["gradient_checkpointing"] and accelerator.device.type == "cpu":
        accelerator.print("gradient_checkpointing skipped on CPU: recomputing activations costs time, memory is not short")
    elif p["gradient_checkpointing"]:
        model.enable_gradient_checkpointing()
    n_train = sum(x.numel() for x in model.parameters() if x.requires_grad)
    n_all = sum(x.numel() for x in model.parameters())

    # ---- data --------------------------------------------------------------------------------
    from pipeline.skipped import skipped_volumes

    skipped = skipped_volumes(args.skipped_qc).ids  # on_error: skip; any other missing volume is an error

    def dataset(reports, with_targets=True):
        return build_dataset(
            args.features,
            args.attributes,
            reports,
            model.tokenizer,
            stage=args.stage,
            use_mask_tokens=config.prompt_uses_masks,
            use_attributes=config.prompt_uses_attributes,
            n_vision=config.n_vision,
            max_length=p["max_length"],
            with_targets=with_targets,
            store=store,
            skipped=skipped,
        )

    train_ds, val_ds = dataset(args.train_reports), dataset(args.val_reports)
    selecting = p["select_by"] == "val_ca_f1"
    if selecting:  # the validation prompts without their targets, and the findings they are scored on
        val_prompts = dataset(args.val_reports, with_targets=False)
        val_references = reference_texts(args.val_reports, val_prompts.volume_ids)
    best = BestWeights(out / "selection") if is_main else None  # only the main process keeps it
    fitted = model.fit_feature_norms(train_ds[i] for i in range(len(train_ds)))
    collate = Collator(model.tokenizer.pad_token_id, padding_side="right", pack=bool(p["pack"]))
    train_sampler = LengthGroupedBatchSampler(train_ds.lengths, p["batch_size"], seed=p["seed"])
    val_sampler = LengthGroupedBatchSampler(val_ds.lengths, p["batch_size"], shuffle=False)
    # own generators: creating a loader iterator then draws from them, not from the global RNG stream,
    # so a resumed run (which creates a different number of iterators) replays the same dropout masks
    loader_kw = {"collate_fn": collate, "num_workers": p["num_workers"]}
    train_loader = torch.utils.data.DataLoader(
        train_ds, batch_sampler=train_sampler, generator=torch.Generator().manual_seed(p["seed"]), **loader_kw
    )
    val_loader = torch.utils.data.DataLoader(
        val_ds, batch_sampler=val_sampler, generator=torch.Generator().manual_seed(p["seed"] + 1), **loader_kw
    )

    # ---- optimizer, schedule -----------------------------------------------------------------
    trainable = [(n, x) for n, x in model.named_parameters() if x.requires_grad]
    groups = [
        {"params": [x for n, x in trainable if x.ndim >= 2], "weight_decay": p["weight_decay"]},
        {"params": [x for n, x in trainable if x.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=p["lr"], fused=bool(p["fused_adamw"]) or None)
    # each process sees ceil(batches / processes) batches; Accelerate steps a prepared scheduler once per
    # process per optimizer step, so the schedule is laid out in process-steps
    batches_per_process = math.ceil(len(train_sampler) / accelerator.num_processes)
    steps_per_epoch = math.ceil(batches_per_process / p["grad_accum"])
    total_steps = steps_per_epoch * p["epochs"]
    nproc = accelerator.num_processes
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, int(p["warmup_ratio"] * total_steps) * nproc, total_steps * nproc
    )
    model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, val_loader, scheduler
    )
    if len(train_loader) != batches_per_process:
        raise RuntimeError(
            f"expected {batches_per_process} batches per process, loader has {len(train_loader)}"
        )

    # checkpoints hold the trainable tensors only, never a copy of the frozen LM
    def keep_trainable(models, weights, output_dir):
        for i, m in enumerate(models):
            names = {n for n, x in m.named_parameters() if x.requires_grad}
            weights[i] = {k: v for k, v in weights[i].items() if k in names}

    accelerator.register_save_state_pre_hook(keep_trainable)

    def save_checkpoint(step: int, epoch: int, batches_done: int) -> None:
        final, tmp = ckpt_dir / f"step-{step}", ckpt_dir / f"step-{step}.tmp"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        kw = {"exclude_frozen_parameters": True} if is_deepspeed else {}
        accelerator.save_state(str(tmp), **kw)
        accelerator.wait_for_everyone()
        if is_main:
            state = {"step": step, "epoch": epoch, "batches_done": batches_done, "params": p,
                     "experiment": identity}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted(
                (c for c in ckpt_dir.glob("step-*") if c.name[5:].isdigit()), key=lambda c: int(c.name[5:])
            )
            for old in done[: -p["keep_checkpoints"]] if p["keep_checkpoints"] > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    # ---- resume ------------------------------------------------------------------------------
    identity = experiment_identity(p, config.to_dict(), args, train_ds.volume_ids, accelerator.num_processes)
    global_step, start_epoch, skip_batches, resumed_after_epoch_end = 0, 0, 0, False
    ckpt = latest_checkpoint(ckpt_dir) if args.resume else None
    if ckpt is not None:
        saved = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8")).get("experiment")
        diff = ["no experiment record (written by an older trainer)"] if saved is None else identity_diff(saved, identity)
        if diff:
            msg = (
                f"{ckpt} was written by a different experiment config; not loading it. Differences "
                f"(checkpoint -> this run): {'; '.join(diff[:8])}"
            )
            if args.on_mismatch == "fail":
                raise SystemExit(msg + f". Remove {ckpt_dir} or pass --on-mismatch restart to start over.")
            accelerator.print(msg + f". --on-mismatch restart: removing {ckpt_dir}, starting over.")
            accelerator.wait_for_everyone()
            if is_main:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            accelerator.wait_for_everyone()
            ckpt = None
    if ckpt is None and is_main:  # a fresh start forgets what an earlier run selected
        best.clear()
    if ckpt is not None:
        state = json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
        kw = {"load_module_strict": False} if is_deepspeed else {"strict": False}
        accelerator.load_state(str(ckpt), **kw)
        global_step, start_epoch, skip_batches = state["step"], state["epoch"], state["batches_done"]
        if skip_batches >= len(train_loader):
            start_epoch, skip_batches, resumed_after_epoch_end = start_epoch + 1, 0, True
        if is_main:  # drop log lines of work after the checkpoint: it is done again
            recs = [r for r in read_log(log_path) if r.get("step", 0) <= global_step]
            log_path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    elif is_main and log_path.exists():
        log_path.unlink()

    if p["log_with"]:
        accelerator.init_trackers("tensorboard", config={k: v for k, v in p.items() if isinstance(v, (int, float, str, bool))})

    def log(record: dict) -> None:
        if is_main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = tracker_values(record) if p["log_with"] else {}
        if scalars:
            accelerator.log(scalars, step=record.get("step", 0))

    log(
        {
            "event": "resume" if global_step else "start",
            "step": global_step,
            "stage": args.stage,
            "trainable_params": n_train,
            "feature_norms_fitted": fitted,
            "total_params": n_all,
            "train_volumes": len(train_ds),
            "val_volumes": len(val_ds),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "num_processes": accelerator.num_processes,
            "ranks": ranks,
            "mixed_precision": accelerator.mixed_precision,
            "truncated_targets": train_ds.n_truncated + val_ds.n_truncated,
            "truncated_volumes": (train_ds.truncated_ids + val_ds.truncated_ids)[:20],
            "empty_targets_dropped": train_ds.n_empty_targets + val_ds.n_empty_targets,
            "empty_target_volumes": (train_ds.empty_target_ids + val_ds.empty_target_ids)[:20],
            "skipped_volumes": sorted(train_ds.skipped_ids + val_ds.skipped_ids),  # by a data stage (QC tables)
            "params": p,
        }
    )
    if is_main and train_ds.n_truncated + val_ds.n_truncated:
        bar_msg = f"{train_ds.n_truncated + val_ds.n_truncated} target(s) cut at max_length={p['max_length']}"
        print(bar_msg, file=sys.stderr)
    if is_main and train_ds.n_empty_targets + val_ds.n_empty_targets:
        print(f"{train_ds.n_empty_targets + val_ds.n_empty_targets} report(s) with an empty target left out",
              file=sys.stderr)

    @torch.no_grad()
    def evaluate() -> float:
        # validation must not move the training RNG stream (a resumed run skips it), so fork it
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            return _evaluate()

    def _evaluate() -> float:
        model.eval()
        total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
        for batch in val_loader:
            loss = model(**batch).loss
            n = (batch["labels"][:, 1:] != -100).sum()
            total += loss.float() * n
            count += n
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
        model.train()
        return (total / count.clamp(min=1)).item()

    @torch.no_grad()
    def val_ca_f1() -> tuple[float | None, dict]:
        """Generate the validation reports (split over the processes) and score them (model/selection.py)."""
        devices = [accelerator.device] if accelerator.device.type == "cuda" else []
        net = accelerator.unwrap_model(model)
        net.eval()
        with torch.random.fork_rng(devices=devices):
            mine = range(accelerator.process_index, len(val_prompts), accelerator.num_processes)
            raw = generate_texts(
                net, val_prompts, mine, batch_size=p["select_batch_size"],
                max_new_tokens=p["select_max_new_tokens"],
                autocast_dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else None,
            )
        net.train()
        texts = {vid: t for part in gather_object([raw]) for vid, t in part.items()}
        reports = [report_text(texts[vid], args.stage) for vid in val_prompts.volume_ids]
        return macro_ca_f1(val_references, reports)

    # ---- training loop -----------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=global_step, disable=not is_main, desc=f"stage {args.stage}")
    t0, stopped = time.time(), False
    run_loss = torch.zeros((), device=accelerator.device)  # summed on device: no sync per micro-batch
    run_n = 0
    # throughput of the loop itself (forward, backward, step, data, logging); validation and
    # checkpoint writes are timed apart
    tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)
    side_s = 0.0
    model.train()

    def validate(epoch_done: int) -> None:
        nonlocal side_s
        t = time.time()
        record = {"step": global_step, "epoch": epoch_done, "val_loss": evaluate()}
        msg = f"epoch {epoch_done}: validation loss {record['val_loss']:.4f}"
        if selecting and (epoch_done % p["select_every"] == 0 or epoch_done == p["epochs"]):
            score, per_class = val_ca_f1()
            kept = is_main and best.offer(
                score, accelerator.unwrap_model(model).trainable_state_dict(), step=global_step, epoch=epoch_done
            )
            record.update(val_ca_f1=score, val_ca_f1_per_class=per_class, selected=kept)
            msg += f", clinical F1 {'n/a' if score is None else f'{score:.3f}'}{' (best so far)' if kept else ''}"
        side_s += time.time() - t
        log(record)  # after the selection: a run killed before this line scores the epoch again
        if is_main:
            bar.write(msg)

    if resumed_after_epoch_end and not any(
        "val_loss" in r and r.get("epoch") == start_epoch for r in read_log(log_path)
    ):  # killed between the epoch's last checkpoint and its validation
        validate(start_epoch)
    for epoch in range(start_epoch, p["epochs"]):
        train_sampler.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        loader, first = train_loader, 0
        if epoch == start_epoch and skip_batches:
            loader, first = accelerator.skip_first_batches(train_loader, skip_batches), skip_batches
            loader.set_epoch(epoch)
        for bi, batch in enumerate(loader, start=first):
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and p["max_grad_norm"]:
                    accelerator.clip_grad_norm_([x for _, x in trainable], p["max_grad_norm"])
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            run_loss += loss.detach().float()
            run_n += 1
            tokens += batch["attention_mask"].sum()
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            bar.update(1)
            if global_step % p["log_every"] == 0 or global_step == total_steps:
                mean = accelerator.reduce(run_loss / run_n, "mean").item()
                log(
                    {
                        "step": global_step,
                        "epoch": epoch + (bi + 1) / len(train_loader),
                        "loss": mean,
                        "lr": scheduler.get_last_lr()[0],
                        "elapsed_s": round(time.time() - t0, 2),
                    }
                )
                bar.set_postfix(loss=f"{mean:.3f}")
                run_loss.zero_()
                run_n = 0
            if p["checkpoint_every"] and global_step % p["checkpoint_every"] == 0:
                t = time.time()
                save_checkpoint(global_step, epoch, bi + 1)
                side_s += time.time() - t
            if p["stop_after_steps"] and global_step >= p["stop_after_steps"]:
                stopped = True
                break
        if stopped:
            break
        validate(epoch + 1)
    bar.close()
    loop_s = time.time() - t0 - side_s
    all_tokens = int(accelerator.reduce(tokens, "sum").item())

    # ---- finish ------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if is_main:
        plot_loss(log_path, out / "loss.png")
    if stopped:
        log({"event": "stopped", "step": global_step})
        return 0
    log(
        {
            "event": "done",
            "step": global_step,
            "elapsed_s": round(time.time() - t0, 2),
            "loop_s": round(loop_s, 3),
            "train_tokens": all_tokens,
            "tokens_per_s": round(all_tokens / max(loop_s, 1e-9), 1),
        }
    )
    if is_main and selecting:
        net = accelerator.unwrap_model(model)
        if best.record is None:
            print("select_by val_ca_f1: no validation reference names a class, keeping the last weights",
                  file=sys.stderr)
            log({"event": "selected", "step": global_step, "val_ca_f1": None, "reason": "no scored epoch"})
        else:
            state = best.state()
            wanted = set(net.trainable_state_dict())
            if set(state) != wanted:
                raise RuntimeError(f"{best.folder}: selected weights do not match the network's trainable tensors")
            net.load_state_dict(state, strict=False)
            r = best.record
            log({"event": "selected", "step": r["step"], "epoch": r["epoch"], "val_ca_f1": r["score"]})
    if is_main:
        accelerator.unwrap_model(model).save_pretrained(out)
        best.clear()  # its weights are now the folder's
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
