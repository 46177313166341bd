"""The MedRegion-CT stage-2 training step on a randomly initialised LLaMA-3-8B-shaped LM, today's step and
each speed-up side by side in one run: tokens/s, model FLOP/s and its fraction of the card, peak memory,
and the loss on a fixed batch (each variant must match today's within tolerance).

    python benchmarks/gpu_train_step.py --device cuda --out DIR      # on a GPU (H100: a few minutes)
    python benchmarks/gpu_train_step.py --tiny --device cpu --out DIR # the same code path, tiny shapes

What runs is the real network (model.network.MedRegionCT: linear connector for 356 vision tokens, Osprey
mask extractor for 9 <mask><pos> pairs, placeholder splice, PEFT LoRA r 16 / alpha 32 on q, k, v, o,
gate, up, down) around a LlamaForCausalLM of LLaMA-3-8B's shape (hidden 4096, 32 layers, 32 heads,
8 KV heads, intermediate 14336, vocab 128256) built directly on the device in bf16 (no CPU copy of
the 8B weights). Samples are the paper's length (356 vision + 18 mask slots + attribute text +
structured six-region target), ~1,000-1,600 tokens (`--tokens` is the middle one), batched by the
trainer's own collator (`model.data.Collator`, padded or packed). Connector, mask extractor and LoRA
stay fp32 under bf16 autocast, as Accelerate's `mixed_precision: bf16` runs them, except in `bf16_lora`.
The LM is random, so the loss means nothing; time, memory and equality of the loss do. No checkpoint or
tokenizer is downloaded: the tokenizer is a small BPE trained here.

Variants (each adds to the one before, except `bf16_lora` and `compile`, which add to `fused_adamw`):
  today              1 sample per micro-batch, gradient checkpointing, LM head on every position
  logits_on_targets  the LM head (128k vocabulary) only where a target token is predicted
  no_checkpointing   no recomputation of activations
  packed             `--pack` samples per micro-batch, end to end in one row (position ids restart per
                     sample: block-diagonal causal attention), nothing padded
  fused_adamw        torch's fused AdamW kernel
  bf16_lora          LoRA, connector and mask extractor weights in bf16 too (speed only: with lr 2e-5 an
                     AdamW update is below bf16's resolution for most weights, so the trainer keeps them fp32)
  compile            torch.compile of the LM (`--compile`; skipped, with the reason, when it fails)
The trainer's switches are `logits_on_targets`, `gradient_checkpointing`, `pack` (with `batch_size`) and
`fused_adamw` (model/train.py), recorded in each run's train_log.jsonl.

Model FLOPs (the same count for every variant, so skipped work shows as speed): per token
4 x (decoder linear + LM head parameters) + 8 x layers x hidden x mean attended length (forward, and the
backward's input gradients: LoRA leaves the frozen weights without weight gradients; recomputation is not
counted). The card's rate is an 8192^3 bf16 matrix product timed in the same run.

Prints a table and writes `DIR/gpu_train_step.json`: card, versions, shapes, per variant step times, tokens/s,
model TFLOP/s, fraction of the matmul rate, peak memory, loss on the fixed batch and its difference to
today's; with `--find-max-pack` the largest packed micro-batch that fits with 10 % of the card to spare.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 160,
    "vocab_size": 4096,
    "rope_theta": 500000.0,
    "max_position_embeddings": 4096,
}
ENCODER_WIDTH = {"full": 768, "tiny": 32}  # RAD-DINO width


def sample_texts() -> tuple[str, str]:
    """A Fig. 5 attribute block and a structured six-region target shaped like RadGenome's."""
    attributes = (
        "Organ Volumes:\nLung:\n- Right Upper Lobe: 1043.2 ml\n- Right Middle Lobe: 412.7 ml\n"
        "- Right Lower Lobe: 1187.9 ml\n- Left Upper Lobe: 1122.4 ml\n- Left Lower Lobe: 1034.8 ml\n"
        "Heart:\n- Left Atrium: 61.3 ml\n- Right Atrium: 58.2 ml\n- Left Ventricle: 122.6 ml\n"
        "- Right Ventricle: 131.0 ml\nLiver: 1483.5 ml\nKidney:\n- Left: 161.2 ml\n- Right: 158.7 ml\n"
        "Lesion Details:\nNodule:\n- count: 2\n- diameter (mm): 6.1, 11.4\n"
        "- location: right upper lobe, left lower lobe\nCyst:\n- count: 1\n- diameter (mm): 14.2\n"
        "- location: left kidney\nEffusion:\n- count: 1\n- diameter (mm): 18.0\n- location: right"
    )
    lung = (
        "When examined in the lung parenchyma window, a 6 mm nodule is observed in the right lung upper lobe. "
        "A nodule measuring 11 mm was detected in the lower lobe of the left lung. Mild emphysematous changes "
        "are observed in both lungs, more prominent in the upper lobes. Pleural effusion reaching 18 mm in "
        "thickness is observed on the right. "
    )
    target = {
        "lung": lung * 3,
        "airways": "Trachea and both main bronchi are in the midline and no obstructive pathology was observed. " * 2,
        "mediastinum": "Mediastinal and hilar lymph nodes are not enlarged. The thoracic esophagus has a normal "
        "calibre. " * 2,
        "heart": "Heart contour and size are normal. No pericardial effusion was detected. There are calcified "
        "atheromatous plaques in the aortic wall. " * 2,
        "osseous": "No lytic or blastic lesion was observed in the osseous structures. " * 2,
        "abdomen": "A 14 mm simple cyst is observed in the left kidney. " * 2,
    }
    from model.prompt import format_structured

    return attributes, format_structured(target)


def build(args, device: torch.device):
    """The network (LoRA added, stage-2 trainable parts) and a function giving sample i as a dataset item."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.demo_llm import build_tokenizer
    from model.network import MedRegionCT, MedRegionCTConfig
    from model.prompt import build_example, build_prompt_text, encode_prompt, encode_target

    shape = TINY if args.tiny else LLAMA3_8B
    attributes, target = sample_texts()
    tokenizer = build_tokenizer([attributes, target] * 4, vocab_size=600)
    lcfg = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       attention_dropout=0.0)
    t = time.perf_counter()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # parameters are created (and randomly initialised) on the device
            llm = LlamaForCausalLM(lcfg)
    finally:
        torch.set_default_dtype(previous)
    llm.config.use_cache = False
    if device.type == "cuda":
        torch.cuda.synchronize()
    init_s = time.perf_counter() - t
    enc = ENCODER_WIDTH["tiny" if args.tiny else "full"]
    cfg = MedRegionCTConfig(llm_path="random-llama-3-8b-shape", encoder_hidden=enc, mask_grid=(8, 16, 16),
                            mask_hidden=64 if args.tiny else 1024, stage=2, lora_r=16, lora_alpha=32,
                            lora_dropout=0.0, max_length=4096)
    model = MedRegionCT(cfg, llm, tokenizer)  # adds <img>/<mask>/<pos> (ids < the LM's vocabulary)
    model.add_lora()
    model.set_trainable(2)
    model.connector.to(device)
    model.mask_extractor.to(device)
    prompt = encode_prompt(tokenizer, build_prompt_text(attributes))
    base_target = encode_target(tokenizer, target)

    def item(i: int, length: int) -> dict:
        tgt = base_target
        while len(prompt) + len(tgt) < length:  # more report text up to the sample's length
            tgt = tgt[:-1] + tgt[:-1] + tgt[-1:]
        ids, labels = build_example(prompt, tgt, length)
        g = torch.Generator().manual_seed(i)
        return {
            "volume_id": f"v{i}",
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor(labels),
            "vision": torch.randn((cfg.n_vision, enc), generator=g),
            "mask_pooled": torch.randn((cfg.n_masks, cfg.levels, enc), generator=g),
            "mask_grid": (torch.rand((cfg.n_masks, *cfg.mask_grid), generator=g) > 0.7).float(),
        }

    info = {"prompt_tokens": len(prompt), "vision_tokens": cfg.n_vision, "mask_slots": 2 * cfg.n_masks,
            "init_on_device_s": round(init_s, 2)}
    return model, item, info


def sample_lengths(prompt_tokens: int, tokens: int, n: int) -> list[int]:
    """n sample lengths whose targets spread 0.6-1.4x around `tokens`' (the spread of real reports, so that
    padding to the longest costs what it costs in training)."""
    spread = [0.6, 1.0, 1.4, 0.8, 1.2, 0.7, 1.3, 0.9]
    target = max(tokens - prompt_tokens, 8)
    return [prompt_tokens + int(target * spread[i % len(spread)]) for i in range(n)]


def model_flops_per_token(shape: dict, mean_context: float) -> float:
    h, layers, inter, kv = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], (
        shape["hidden_size"] * shape["num_key_value_heads"] // shape["num_attention_heads"])
    decoder = layers * (2 * h * h + 2 * h * kv + 3 * h * inter)
    head = shape["vocab_size"] * h
    return 4.0 * (decoder + head) + 8.0 * layers * h * mean_context


def matmul_rate(device: torch.device, n: int) -> float:
    """FLOP/s of an n^3 bf16 matrix product (median of 5 after warm-up)."""
    a = torch.randn((n, n), device=device, dtype=torch.bfloat16)
    b = torch.randn((n, n), device=device, dtype=torch.bfloat16)
    times = []
    for i in range(7):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return 2.0 * n**3 / statistics.median(times)


VARIANTS = {  # name -> settings; each later one inherits the earlier's unless it says otherwise
    "today": {"checkpointing": True, "logits_on_targets": False, "pack": False, "fused": False, "bf16_lora": False,
              "compile": False},
    "logits_on_targets": {"logits_on_targets": True},
    "no_checkpointing": {"checkpointing": False},
    "packed": {"pack": True},
    "fused_adamw": {"fused": True},
    "bf16_lora": {"bf16_lora": True},
    "compile": {"bf16_lora": False, "compile": True},
}


def settings_of(name: str) -> dict:
    out: dict = {}
    for v, s in VARIANTS.items():
        out.update(s)
        if v == name:
            return out
    raise KeyError(name)


def set_checkpointing(model, on: bool) -> None:
    base = model.llm.get_base_model()
    if on:
        model.enable_gradient_checkpointing()
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


def run_variant(name: str, model, initial: dict, items: list[dict], reference_batch: dict, args, device) -> dict:
    from model.data import Collator

    st = settings_of(name)
    model.load_state_dict(initial, strict=False)  # the same trainable weights at the start of every variant
    trainable_modules = [model.connector, model.mask_extractor]
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    dtype = torch.bfloat16 if st["bf16_lora"] else torch.float32
    for m in trainable_modules:
        m.to(dtype)
    for p in lora:
        p.data = p.data.to(dtype)
    set_checkpointing(model, st["checkpointing"])
    model.logits_on_targets = st["logits_on_targets"]
    collate = Collator(model.tokenizer.pad_token_id, pack=st["pack"])
    per_step = args.pack if st["pack"] else 1
    batches = [collate(items[i : i + per_step]) for i in range(0, len(items), per_step)]
    to_dev = lambda b: {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in b.items()}  # noqa: E731
    batches = [to_dev(b) for b in batches]
    forward = model
    compile_error = None
    if st["compile"]:
        try:
            model.llm.compile()
        except Exception as exc:  # noqa: BLE001 - recorded, the variant is skipped
            compile_error = f"{type(exc).__name__}: {exc}"
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-5, fused=True if st["fused"] else None)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)  # as mixed_precision: bf16 (CPU too, same path)
    if compile_error:
        return {"variant": name, "settings": st, "skipped": compile_error}
    with torch.no_grad(), autocast:  # the loss of the fixed batch in this variant's layout, before any step
        ref = collate(items[: args.pack]) if st["pack"] else reference_batch
        loss0 = forward(**to_dev(ref)).loss.float().item()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)

    def step(batch) -> float:
        with autocast:
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float().item()  # .item() synchronises: the step is finished

    times, tokens = [], []
    try:
        for i in range(args.warmup + args.steps):
            batch = batches[i % len(batches)]
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(batch)
            if i >= args.warmup:
                times.append(time.perf_counter() - t)
                tokens.append(int(batch["attention_mask"].sum()))
    except torch.OutOfMemoryError as exc:
        return {"variant": name, "settings": st, "skipped": f"out of memory: {str(exc)[:200]}"}
    finally:
        if st["compile"]:
            model.llm = getattr(model.llm, "_orig_mod", model.llm)
    med = statistics.median(times)
    out = {"variant": name, "settings": st, "samples_per_step": per_step,
           "tokens_per_step": round(statistics.mean(tokens), 1), "step_s": [round(x, 4) for x in times],
           "step_s_median": round(med, 4), "tokens_per_s": round(statistics.mean(tokens) / med, 1),
           "loss_fixed_batch": loss0}
    if device.type == "cuda":
        out["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def find_max_pack(model, initial, item_of, info_prompt: int, args, device) -> dict:
    """Packed micro-batches of 1, 2, 4, ... samples with the fastest settings until one does not fit with 10 %
    of the card to spare (GPU only)."""
    total = torch.cuda.get_device_properties(device).total_memory / 2**30
    fits = {}
    k = 1
    while k <= 64:
        a = copy.copy(args)
        a.pack, a.warmup, a.steps = k, 1, 1
        items = [item_of(i, n) for i, n in enumerate(sample_lengths(info_prompt, args.tokens, k))]
        r = run_variant("fused_adamw", model, initial, items, {}, a, device) if k > 0 else {}
        torch.cuda.empty_cache()
        if "skipped" in r:
            break
        fits[k] = r["peak_memory_allocated_gib"]
        if r["peak_memory_allocated_gib"] > 0.9 * total:
            break
        k *= 2
    ok = [k for k, m in fits.items() if m <= 0.9 * total]
    return {"card_memory_gib": round(total, 1), "peak_gib_by_samples": fits, "largest_with_10pct_spare": max(ok) if ok else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/gpu_train_step.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda or cpu")
    ap.add_argument("--out", required=True, type=Path, help="folder for gpu_train_step.json")
    ap.add_argument("--tiny", action="store_true", help="tiny LM / encoder shapes (CPU check of the code path)")
    ap.add_argument("--tokens", type=int, default=1300, help="middle sample length in tokens")
    ap.add_argument("--pack", type=int, default=4, help="samples per packed micro-batch")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    ap.add_argument("--variants", nargs="+", default=[v for v in VARIANTS if v != "compile"], choices=list(VARIANTS),
                    help="which to run (default: all but compile)")
    ap.add_argument("--compile", action="store_true", help="also run the torch.compile variant")
    ap.add_argument("--find-max-pack", action="store_true", help="GPU: largest packed micro-batch that fits")
    ap.add_argument("--tolerance", type=float, default=None,
                    help="largest relative loss difference to today's (default 2e-2 with bf16 on a GPU, 1e-2 on CPU)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available")
    variants = list(args.variants) + (["compile"] if args.compile and "compile" not in args.variants else [])
    tolerance = args.tolerance if args.tolerance is not None else (2e-2 if device.type == "cuda" else 1e-2)
    import peft
    import transformers

    t_all = time.perf_counter()
    model, item_of, info = build(args, device)
    model.train()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if k in dict(model.named_parameters())
               and dict(model.named_parameters())[k].requires_grad}
    n_items = max(args.pack, 1) * 2
    items = [item_of(i, n) for i, n in enumerate(sample_lengths(info['prompt_tokens'], args.tokens, n_items))]
    from model.data import Collator

    reference_batch = Collator(model.tokenizer.pad_token_id)(items[: args.pack])
    rate = matmul_rate(device, 512 if args.tiny else 8192)
    shape = TINY if args.tiny else LLAMA3_8B
    mean_len = statistics.mean(len(it["input_ids"]) for it in items)
    flops_token = model_flops_per_token(shape, mean_len / 2)
    results = []
    base_loss = None
    for name in variants:
        r = run_variant(name, model, initial, items, reference_batch, args, device)
        if "skipped" not in r:
            r["model_tflops_per_s"] = round(r["tokens_per_s"] * flops_token / 1e12, 4)
            r["fraction_of_matmul_rate"] = round(r["tokens_per_s"] * flops_token / rate, 4)
            if name == "today":
                base_loss = r["loss_fixed_batch"]
            if base_loss is not None:
                r["loss_rel_diff_to_today"] = abs(r["loss_fixed_batch"] - base_loss) / abs(base_loss)
        results.append(r)
        print(f"{name:18s} " + (f"skipped: {r['skipped']}" if "skipped" in r else
              f"{r['tokens_per_s']:10.1f} tokens/s  {r['model_tflops_per_s']:8.3f} TFLOP/s  "
              f"{100 * r['fraction_of_matmul_rate']:5.1f} % of matmul  loss {r['loss_fixed_batch']:.4f}"
              + (f"  peak {r['peak_memory_allocated_gib']} GiB" if "peak_memory_allocated_gib" in r else "")), flush=True)
    result = {
        "benchmark": "MedRegion-CT stage-2 train step variants, random LLaMA-3-8B-shaped LM"
        + (" (TINY shapes)" if args.tiny else ""),
        "device": str(device),
        "card": (torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()) or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "llm_shape": shape,
        "lora": {"r": 16, "alpha": 32, "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"]},
        "sample_lengths": [len(it["input_ids"]) for it in items],
        **info,
        "matmul_bf16_tflops_per_s": round(rate / 1e12, 3),
        "model_flops_per_token": flops_token,
        "tolerance_rel_loss": tolerance,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "variants": results,
    }
    done = [r for r in results if "skipped" not in r]
    if base_loss is not None:
        result["losses_match_today"] = all(r["loss_rel_diff_to_today"] <= tolerance for r in done)
        best = max(done, key=lambda r: r["tokens_per_s"])
        today = next(r for r in done if r["variant"] == "today")
        result["best"] = {"variant": best["variant"], "tokens_per_s": best["tokens_per_s"],
                          "speedup_over_today": round(best["tokens_per_s"] / today["tokens_per_s"], 2)}
    if args.find_max_pack and device.type == "cuda":
        result["max_pack"] = find_max_pack(model, initial, item_of, info["prompt_tokens"], args, device)
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train_step.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if "best" in result:
        print(f"{result['card']}: best {result['best']['variant']} {result['best']['tokens_per_s']:.0f} tokens/s, "
              f"x{result['best']['speedup_over_today']} over today's step; losses match today's within "
              f"{tolerance}: {result['losses_match_today']}")
    return 0 if result.get("losses_match_today", True) else 1


if __name__ == "__main__":
    sys.exit(main())
