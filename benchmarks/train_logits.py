"""Training tokens/s with the LM head on every position against only on the target positions, same batches.

    python benchmarks/train_logits.py --llm results/llm/SmolLM2-135M-Instruct.Q4_1 [--steps 3] [--batch-size 2]
    python benchmarks/train_logits.py --tiny   # a 2-layer demo-size Llama: checks the script, no figure to report

Stage-2 steps (forward, backward, AdamW step; connector + mask extractor + LoRA trainable) on a prompt of
the real shape (356 vision tokens, 9 <mask><pos> pairs, an attribute block, a six-region target) with
synthetic features. Three variants run interleaved step by step on the same batches, so a busy machine
slows all of them alike:

* `full+ckpt`: logits on every position, gradient checkpointing on (what a GPU config asks for);
* `full`: logits on every position (the LM's own loss), no checkpointing (the trainer's CPU choice);
* `targets`: logits only where a target token is predicted (`logits_on_targets`, the default).

Prints tokens/s (real tokens, padding excluded) per variant, the ratio to `full+ckpt` and to `full`, and
the largest loss difference between variants (same weights: the first step's losses must agree).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

C = 64  # encoder width of the synthetic features (only the connector's input size depends on it)
ATTRIBUTES = (
    "Organ Volumes:\nLung:\n- Right Upper Lobe: 1032.5 ml\n- Right Middle Lobe: 412.0 ml\n- Right Lower Lobe: 1411.2 ml\n"
    "- Left Upper Lobe: 1188.9 ml\n- Left Lower Lobe: 1290.4 ml\nHeart:\n- Left Atrium: 61.3 ml\n- Left Ventricle: 142.8 ml\n"
    "- Right Atrium: 70.2 ml\n- Right Ventricle: 120.6 ml\nAbdomen:\n- Liver: 1520.7 ml\n- Left Kidney: 160.4 ml\n"
    "- Right Kidney: 152.9 ml\nLesion Details:\nNodule:\n- count: 2\n- diameter: 6.1 mm, 4.3 mm\n"
    "- location: right upper lobe, left lower lobe\nEffusion:\n- count: 1\n- location: right pleural space"
)
REGION_TEXTS = {
    "lung": "A 6 mm solid nodule in the right upper lobe and a 4 mm nodule in the left lower lobe. Small right "
            "pleural effusion with adjacent passive atelectasis. No consolidation.",
    "airways": "Trachea and main bronchi are patent.",
    "mediastinum": "No pathologically enlarged mediastinal or hilar lymph nodes.",
    "heart": "Heart size is normal. No pericardial effusion. Calcified plaques in the coronary arteries.",
    "osseous": "Degenerative changes in the thoracic spine. No lytic or sclerotic lesion.",
    "abdomen": "A simple cyst in the left kidney. Liver and spleen are normal in size.",
}


def make_inputs(root: Path, n_volumes: int, seed: int = 0) -> dict:
    import numpy as np
    import pandas as pd

    from pipeline.feature_store import write_feature_shard

    rng = np.random.default_rng(seed)
    ids = [f"vol{i:03d}" for i in range(n_volumes)]
    arrays = {
        "global": rng.normal(0, 1, (n_volumes, 32, C)),
        "region": rng.normal(0, 1, (n_volumes, 324, C)),
        "mask_pooled": rng.normal(0, 1, (n_volumes, 9, 4, C)),
        "mask_grid": rng.random((n_volumes, 9, 8, 16, 16)) > 0.5,
        "region_slices": np.tile(np.arange(6), (n_volumes, 1)),
        "mask_present": np.ones((n_volumes, 9), bool),
    }
    write_feature_shard(root / "shard-0.zarr", ids, arrays, {"hidden_size": C, "encoder": "benchmark"})
    words = list(REGION_TEXTS["lung"].split())
    rows = []
    for i, v in enumerate(ids):  # lengths vary a little, as real reports do
        texts = dict(REGION_TEXTS)
        texts["lung"] = " ".join(words[: len(words) - 3 * (i % 4)]) + "."
        rows.append({"volume_id": v, **texts, "findings": " ".join(texts.values())})
    pd.DataFrame(rows).to_parquet(root / "reports.parquet")
    pd.DataFrame([{"volume_id": v, "prompt": ATTRIBUTES} for v in ids]).to_parquet(root / "attributes.parquet")
    return {"features": [root / "shard-0.zarr"], "attributes": [root / "attributes.parquet"],
            "reports": root / "reports.parquet"}


def tiny_llm(root: Path) -> str:
    from model.demo_llm import build_demo_llm

    texts = [" ".join(REGION_TEXTS.values()), ATTRIBUTES] * 20
    return str(build_demo_llm(root / "llm", texts, vocab_size=400, hidden_size=32, layers=2, heads=4, seed=0))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", default=None, help="base LM folder (e.g. the llm_gguf rule's SmolLM2 folder)")
    ap.add_argument("--tiny", action="store_true", help="a tiny demo-size LM instead (checks the script)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one untimed warm-up)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if not args.tiny and not args.llm:
        ap.error("give --llm FOLDER or --tiny")
    import torch

    from model.data import Collator, build_dataset
    from model.network import MedRegionCT, MedRegionCTConfig

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="train_logits-") as tmp:
        root = Path(tmp)
        n_batches = args.steps + 1
        inp = make_inputs(root, n_batches * args.batch_size)
        llm = tiny_llm(root) if args.tiny else args.llm
        torch.manual_seed(0)
        config = MedRegionCTConfig(llm_path=llm, encoder_hidden=C, mask_hidden=256, stage=2, lora_dropout=0.0,
                                   new_token_init="mean")
        model = MedRegionCT.from_config(config)
        model.train()
        ds = build_dataset(inp["features"], inp["attributes"], inp["reports"], model.tokenizer, stage=2,
                           use_mask_tokens=True, use_attributes=True, n_vision=config.n_vision)
        collate = Collator(model.tokenizer.pad_token_id)
        batches = [collate([ds[i] for i in range(b * args.batch_size, (b + 1) * args.batch_size)])
                   for b in range(n_batches)]
        start_state = {k: v.clone() for k, v in model.trainable_state_dict().items()}
        variants = {"full+ckpt": (False, True), "full": (False, False), "targets": (True, False)}
        optimizers = {}
        states = {name: {k: v.clone() for k, v in start_state.items()} for name in variants}
        seconds = {name: 0.0 for name in variants}
        first_loss: dict[str, float] = {}
        tokens = 0
        base = model.llm.get_base_model()
        for step, batch in enumerate(batches):
            n_tok = int(batch["attention_mask"].sum())
            for name, (on_targets, ckpt) in variants.items():
                model.load_state_dict(states[name], strict=False)  # each variant trains its own copy
                opt = optimizers.setdefault(name, torch.optim.AdamW(
                    [p for p in model.parameters() if p.requires_grad], lr=1e-4))
                model.logits_on_targets = on_targets
                if ckpt:
                    model.enable_gradient_checkpointing()
                else:
                    base.activation_checkpointing_disable()
                assert base.is_activation_checkpointing == ckpt, name
                t0 = time.perf_counter()
                loss = model(**batch).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                dt = time.perf_counter() - t0
                states[name] = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
                if step == 0:
                    first_loss[name] = float(loss)
                else:
                    seconds[name] += dt
                print(f"step {step} {name:10s} {n_tok} tokens {dt:7.2f} s loss {float(loss):.5f}", flush=True)
            if step:
                tokens += n_tok
        rate = {name: tokens / s for name, s in seconds.items()}
        result = {
            "llm": "tiny demo-size Llama" if args.tiny else Path(llm).name,  # the name: no machine path
            "batch_size": args.batch_size, "timed_steps": args.steps, "tokens_per_step": tokens / args.steps,
            "target_share": float(sum(int((b["labels"] != -100).sum()) for b in batches[1:]) / tokens),
            "tokens_per_s": rate,
            "ratio_targets_vs_full": rate["targets"] / rate["full"],
            "ratio_targets_vs_full_ckpt": rate["targets"] / rate["full+ckpt"],
            "first_step_loss": first_loss,
            "max_first_loss_difference": max(first_loss.values()) - min(first_loss.values()),
            "threads": torch.get_num_threads(),
        }
    print(json.dumps(result, indent=2))
    for name in variants:
        print(f"{name:10s} {rate[name]:8.1f} tokens/s  ({rate[name] / rate['full+ckpt']:.2f}x full+ckpt, "
              f"{rate[name] / rate['full']:.2f}x full)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
