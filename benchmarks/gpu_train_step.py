"""One MedRegion-CT stage-2 training step on a randomly initialised LLaMA-3-8B-shaped LM: tokens/s, memory.

    python benchmarks/gpu_train_step.py --device cuda --out DIR      # on a GPU (H100: well under 3 min)
    python benchmarks/gpu_train_step.py --tiny --device cpu --out DIR # the same code path, tiny shapes

What runs is the real network (model.network.MedRegionCT: linear connector for 356 vision tokens, Osprey
mask extractor for 9 <mask><pos> pairs, placeholder splice, PEFT LoRA r 16 / alpha 32 on q, k, v, o,
gate, up, down) around a LlamaForCausalLM of LLaMA-3-8B's shape (hidden 4096, 32 layers, 32 heads,
8 KV heads, intermediate 14336, vocab 128256) built directly on the device in bf16 (no CPU copy of
the 8B weights), with gradient checkpointing, at one sample of ~1,300 tokens (the paper's batch 1 x 8
micro-batch; 356 vision + 18 mask slots + attribute text + structured target). Connector and mask
extractor stay fp32 under bf16 autocast, as Accelerate's `mixed_precision: bf16` runs them. The LM is
random, so the loss means nothing; time and memory do. Weights are random and no checkpoint or
tokenizer is downloaded: the tokenizer is a small BPE trained here (the LM's vocabulary is larger).

Prints and writes `DIR/gpu_train_step.json`: card, versions, shapes, step times (a few timed steps after
warm-up), tokens/s, peak memory (torch.cuda.max_memory_allocated / reserved).
"""

from __future__ import annotations

import argparse
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
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.demo_llm import build_tokenizer
    from model.network import MedRegionCT, MedRegionCTConfig
    from model.prompt import build_example, build_prompt_text, encode_prompt, encode_target

    shape = TINY if args.tiny else LLAMA3_8B
    attributes, target = sample_texts()
    tokenizer = build_tokenizer([attributes, target] * 4, vocab_size=600)
    lcfg = LlamaConfig(
        **shape,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_dropout=0.0,
    )
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
    cfg = MedRegionCTConfig(
        llm_path="random-llama-3-8b-shape",
        encoder_hidden=enc,
        mask_grid=(8, 16, 16),
        mask_hidden=64 if args.tiny else 1024,
        stage=2,
        lora_r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        max_length=2048,
    )
    model = MedRegionCT(cfg, llm, tokenizer)  # adds <img>/<mask>/<pos> (ids < the LM's vocabulary)
    model.add_lora()
    model.set_trainable(2)
    model.enable_gradient_checkpointing()
    model.connector.to(device)
    model.mask_extractor.to(device)

    prompt = encode_prompt(tokenizer, build_prompt_text(attributes))
    tgt = encode_target(tokenizer, target)
    while len(prompt) + len(tgt) < args.tokens:  # pad the target with more report text up to ~1,300
        tgt = tgt[:-1] + tgt[:-1] + tgt[-1:]
    ids, labels = build_example(prompt, tgt, args.tokens)
    n = len(ids)
    m = len(model.tokenizer)
    assert max(ids) < llm.config.vocab_size and m <= llm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones((1, n), dtype=torch.long, device=device),
        "labels": torch.tensor([labels], device=device),
        "vision": torch.randn((1, cfg.n_vision, enc), generator=g).to(device),
        "mask_pooled": torch.randn((1, cfg.n_masks, cfg.levels, enc), generator=g).to(device),
        "mask_grid": (torch.rand((1, cfg.n_masks, *cfg.mask_grid), generator=g) > 0.7).float().to(device),
    }
    info = {
        "prompt_tokens": len(prompt),
        "target_tokens": n - len(prompt),
        "vision_tokens": cfg.n_vision,
        "mask_slots": 2 * cfg.n_masks,
        "init_on_device_s": round(init_s, 2),
    }
    return model, batch, info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--tiny", action="store_true", help="tiny LM / encoder shapes (CPU check of the code path)")
    ap.add_argument("--tokens", type=int, default=1300, help="sample length in tokens")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda but CUDA is not available")
        torch.cuda.reset_peak_memory_stats(device)
    import peft
    import transformers

    t_all = time.perf_counter()
    model, batch, info = build(args, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    n_lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(trainable, lr=2e-5)
    model.train()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step() -> float:
        with autocast:
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach().float().item()  # .item() synchronises: the step is finished

    losses, times = [], []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        losses.append(step())
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    tokens = int(batch["attention_mask"].sum())
    med = statistics.median(times)
    result = {
        "benchmark": "MedRegion-CT stage-2 train step, random LLaMA-3-8B-shaped LM" + (" (TINY shapes)" if args.tiny else ""),
        "device": str(device),
        "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "llm_shape": TINY if args.tiny else LLAMA3_8B,
        "dtype": "bf16 LM weights; fp32 connector / mask extractor / LoRA under bf16 autocast"
        if device.type == "cuda" else "bf16 LM weights on CPU (no autocast)",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.1,
                 "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        "gradient_checkpointing": True,
        "batch": "1 sample",
        "tokens_per_step": tokens,
        **info,
        "params_total": n_total,
        "params_trainable": n_trainable,
        "params_lora": n_lora,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_s": [round(x, 4) for x in times],
        "step_s_median": round(med, 4),
        "tokens_per_s": round(tokens / med, 1),
        "losses": [round(x, 4) for x in losses],
        "wall_s": round(time.perf_counter() - t_all, 1),
    }
    if device.type == "cuda":
        result["peak_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        result["peak_memory_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        result["card_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    else:
        import resource

        result["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_train_step.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))
    mem = result.get("peak_memory_allocated_gib", result.get("peak_rss_gib"))
    print(f"{result['card']}: {tokens} tokens/step, {med:.3f} s/step (median of {args.steps}), "
          f"{result['tokens_per_s']:.0f} tokens/s, peak memory {mem} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
