"""A tiny, randomly initialised Llama with a byte-level BPE tokenizer trained on the cohort's text.

It is saved with `save_pretrained` (safetensors) and loaded through the same
`AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained` path as a real LLaMA-3.

    python -m model.demo_llm --reports results/reports/train.parquet --out results/demo_llm \\
        [--params-json '{"demo_hidden_size": 128, "demo_layers": 2}']
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pipeline.constants import REGIONS
from pipeline.stage_config import SettingsError, settings_from_cli

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_tokenizer(texts: Iterable[str], vocab_size: int = 2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no <unk> ever
        show_progress=False,
    )
    backend.train_from_iterator((t for t in texts if t), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=4096, **SPECIAL_TOKENS)


def build_demo_llm(
    out_dir: str | os.PathLike,
    texts: Iterable[str],
    vocab_size: int = 2000,
    hidden_size: int = 128,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    max_position_embeddings: int = 4096,
    pretrain_steps: int = 0,
    pretrain_lr: float = 1e-3,
    pretrain_batch: int = 16,
    init_std: float = 0.02,
    device: str = "auto",
) -> Path:
    """Train the tokenizer, build a random LlamaForCausalLM, save both atomically to out_dir.

    `pretrain_steps > 0` first teaches the LM the texts themselves (plain causal-LM training on the
    same texts): the stand-in for a real LM that already knows radiology language, so that stage 1
    (frozen LM, connector only) has something to condition. 0 keeps the weights random.
    `init_std` is the std of the random initialisation (Llama's `initializer_range`; LLaMA's 0.02).
    `device`: where the pre-training runs (`auto`: a GPU when there is one, so that a GPU machine does not
    spend its time on the CPU; on CPU the result is what it always was); the LM is saved from the CPU.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    texts_list = [t for t in texts if t]
    tokenizer = build_tokenizer(texts_list, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    losses: list[float] = []
    if pretrain_steps > 0:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        losses = pretrain(model, tokenizer, texts_list, pretrain_steps, pretrain_lr, pretrain_batch, seed, device)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    summary = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "layers": layers,
        "heads": heads,
        "seed": seed,
        "texts": len(texts_list),
        "pretrain_steps": pretrain_steps,
        "init_std": init_std,
        "pretrain_device": device if pretrain_steps > 0 else None,
        "pretrain_loss_first": losses[0] if losses else None,
        "pretrain_loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
    }
    from pipeline.io import atomic_output

    with atomic_output(out) as tmp:  # a folder renamed into place when complete
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "demo_llm.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out


def pretrain(model, tokenizer, texts: list[str], steps: int, lr: float, batch: int, seed: int,
             device: str = "cpu") -> list[float]:
    """A few hundred steps of next-token training on the texts (BOS text EOS, right-padded), on `device`;
    the model is back on the CPU afterwards."""
    import random

    import torch

    rng = random.Random(seed)
    encoded = [
        [
            tokenizer.bos_token_id,
            *tokenizer(t, add_special_tokens=False)["input_ids"][:510],
            tokenizer.eos_token_id,
        ]
        for t in texts
    ]
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    losses = []
    model.train()
    for _ in range(steps):
        rows = [encoded[rng.randrange(len(encoded))] for _ in range(batch)]
        n = max(map(len, rows))
        ids = torch.full((len(rows), n), tokenizer.pad_token_id)
        labels = torch.full((len(rows), n), -100)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            labels[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        loss = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    model.to("cpu")
    return losses


def attribute_texts(paths: Iterable[str | os.PathLike], volume_ids: Iterable[str] | None = None) -> list[str]:
    """The attribute blocks of Fig. 5 (`prompt` column) of the given volumes, on their own: a real LM can
    read "Nodule: - count: 2 ..." lines; the demo LM learns their words and numbers here. They are never
    paired with a report in pre-training: relating the two is what stage 2 has to learn."""
    import pandas as pd

    keep = None if volume_ids is None else set(map(str, volume_ids))
    texts: list[str] = []
    for path in paths:
        df = pd.read_parquet(path, columns=["volume_id", "prompt"])
        if keep is not None:
            df = df[df["volume_id"].astype(str).isin(keep)]
        texts.extend(str(t) for t in df["prompt"].fillna("") if str(t).strip())
    return texts


def report_volume_ids(paths: Iterable[str | os.PathLike]) -> list[str]:
    import pandas as pd

    return [str(v) for p in paths for v in pd.read_parquet(p, columns=["volume_id"])["volume_id"]]


def report_texts(paths: Iterable[str | os.PathLike]) -> list[str]:
    """Training text for the tokenizer: findings and the region texts of every report row."""
    import pandas as pd

    from model.prompt import format_structured

    texts: list[str] = []
    for path in paths:
        df = pd.read_parquet(path)
        for col in ("findings", *REGIONS):
            if col in df.columns:
                texts.extend(str(t) for t in df[col].fillna("") if str(t).strip())
        # the structured form of each report too: a real LM knows how to write "[Lung]: ...\n[Airways]:"
        # layouts; the demo LM learns it here (its output layer is frozen during LoRA training)
        if all(r in df.columns for r in REGIONS):
            texts.extend(format_structured(row) for row in df[list(REGIONS)].fillna("").to_dict("records"))
    texts.append(format_structured({r: "" for r in REGIONS}))
    return texts


@dataclass(frozen=True)
class DemoLLMSettings:
    """The demo LM's settings: the config's `llm` demo_* keys.

    `demo_pretrain_steps`: causal-LM steps on the texts before saving (0: keep the LM random). A random
    LM's frozen output layer caps what LoRA can learn (demo val loss plateaus ~5.3 nats); 300 steps
    (~30-40 s on 2 cores) stand in for a pretrained LLaMA's language knowledge.
    `demo_init_std`: std of the random initialisation (LLaMA's 0.02). At 0.02 a 256-wide LM starts with
    attention logits ~16x smaller than a 4096-wide LLaMA's (they scale with the width), so its attention
    stays near uniform through pre-training; 0.08 gives the 256-wide LM the logit scale of the 4096-wide one.
    `demo_attribute_text`: the --attributes files' text of the --reports volumes joins the tokenizer and
    pre-training texts (the rule passes them only then).
    """

    demo_hidden_size: int = 128
    demo_layers: int = 2
    demo_vocab_size: int = 2000
    demo_seed: int = 0
    demo_pretrain_steps: int = 300
    demo_attribute_text: bool = False
    demo_init_std: float = 0.02

    def __post_init__(self) -> None:
        if not self.demo_init_std > 0:
            raise SettingsError(f"llm.demo_init_std must be > 0, got {self.demo_init_std}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m model.demo_llm", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--reports", nargs="+", required=True, help="reports parquet(s) with findings + region columns"
    )
    ap.add_argument(
        "--attributes",
        nargs="*",
        default=[],
        help="attribute parquet(s) (`prompt` column), read with demo_attribute_text: the text of the --reports "
        "volumes joins the tokenizer and pre-training texts",
    )
    ap.add_argument("--out", required=True, help="the LM folder to write")
    ap.add_argument("--params-json", default="{}",
                    help='DemoLLMSettings as JSON (the `llm` section\'s demo_* keys), e.g. \'{"demo_hidden_size": 128}\'')
    ap.add_argument("--heads", type=int, default=4, help="attention heads")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the pre-training runs (auto: a GPU when there is one)")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, DemoLLMSettings, args.params_json, section="llm")
    if settings.demo_attribute_text != bool(args.attributes):
        ap.error("--attributes go with llm.demo_attribute_text: give the attribute tables exactly when it is set")
    attributes = args.attributes
    out = build_demo_llm(
        args.out,
        report_texts(args.reports) + attribute_texts(attributes, report_volume_ids(args.reports)),
        vocab_size=settings.demo_vocab_size,
        hidden_size=settings.demo_hidden_size,
        layers=settings.demo_layers,
        heads=args.heads,
        seed=settings.demo_seed,
        pretrain_steps=settings.demo_pretrain_steps,
        init_std=settings.demo_init_std,
        device=args.device,
    )
    print(f"demo LLM written to {out}: {(out / 'demo_llm.json').read_text(encoding='utf-8')}")


if __name__ == "__main__":
    main()
