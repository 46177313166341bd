"""Where does the demo LM look? Attention of the report tokens over the prompt's parts, against uniform.

    python benchmarks/demo_attention.py --results RUN/results [RUN2/results ...] [--volumes 16] [--json F]

A finding that the prompt text does not state (hiatal hernia: only the abdomen's `<mask><pos>` slot carries
it; cardiomegaly: the heart's slot, besides the left atrium's volume in the attribute text) reaches a report
token only through attention to that slot or number. For each finished demo run this
prints, per layer (mean over heads, over the report tokens of `--volumes` training volumes, teacher-forced
through the trained stage-2 model), the attention mass on each part of the sequence next to the part's
share of the positions the token can see: the mass that uniform attention would give. Mass / share ~1
for every part means the LM averages its context instead of reading it: one slot among ~840 positions
then contributes ~1/840 of what a report token reads, whatever the mask extractor puts into it.

Also printed per run: the entropy of the base demo LM's attention (before LoRA) on the second half of
structured training reports, per layer, against the entropy of uniform causal attention. A pretrained
LLM's heads are sharp (entropy well below uniform): they attend to particular tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from demo_learning import model_inputs  # noqa: E402

PARTS = ("vision", "mask slots", "prompt text", "attribute text", "report so far")


def _eager(llm) -> None:
    """Attention weights are only returned by the eager implementation."""
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base.set_attn_implementation("eager")


def part_of_positions(input_ids, labels, img_id: int, mask_ids: tuple[int, int], ignore: int) -> np.ndarray:
    """Index into PARTS for every position of one unpadded example: the text after the last mask slot
    (attribute block, instruction) is "attribute text", the target positions (labels set) the report."""
    ids, lab = np.asarray(input_ids), np.asarray(labels)
    part = np.full(len(ids), PARTS.index("prompt text"))
    part[ids == img_id] = PARTS.index("vision")
    slots = np.isin(ids, mask_ids)
    part[slots] = PARTS.index("mask slots")
    if slots.any():  # the attribute block and the instruction follow the last slot
        after = (np.arange(len(ids)) > np.flatnonzero(slots).max()) & (part == PARTS.index("prompt text"))
        part[after] = PARTS.index("attribute text")
    part[lab != ignore] = PARTS.index("report so far")
    return part


def attention_by_part(model, ds, indices: list[int]) -> dict:
    """`mass` (per layer, per part) and `share` (per part): the attention mass of the report tokens
    (queries) of the examples on each part, averaged over the queries and the heads, and the share of
    the positions each query can see that the part holds (uniform attention's mass);
    `report_tokens`: the number of queries."""
    import torch

    from model.data import Collator
    from model.prompt import IGNORE_INDEX

    _eager(model.llm)
    collate = Collator(model.tokenizer.pad_token_id)
    mass, share, n_queries = None, None, 0
    for i in indices:
        batch = collate([ds[i]])
        ids = batch["input_ids"]
        part = part_of_positions(ids[0], batch["labels"][0], model.img_token_id,
                                 (model.mask_token_id, model.pos_token_id), IGNORE_INDEX)
        queries = np.flatnonzero(part == PARTS.index("report so far"))
        with torch.no_grad():
            embeds = model.build_inputs_embeds(ids, batch["vision"], batch.get("mask_pooled"), batch.get("mask_grid"))
            out = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], output_attentions=True,
                            use_cache=False)
        onehot = np.stack([part == k for k in range(len(PARTS))], axis=1).astype(np.float64)  # (n, parts)
        # a query at position q sees positions 0..q (causal): uniform attention would give each part its
        # share of those
        visible = np.cumsum(onehot, axis=0)[queries] / (queries[:, None] + 1)
        layers = np.stack([a[0].mean(0).double().numpy()[queries] @ onehot for a in out.attentions])  # (L, q, parts)
        mass = layers.sum(1) if mass is None else mass + layers.sum(1)
        share = visible.sum(0) if share is None else share + visible.sum(0)
        n_queries += len(queries)
    return {"mass": (mass / n_queries).tolist(), "share": (share / n_queries).tolist(), "report_tokens": n_queries}


def lm_attention_entropy(llm_dir: Path, texts: list[str]) -> dict[str, list[float] | float]:
    """Mean entropy (nats) of the base LM's attention, per layer, over the queries in the second half of
    each text; and that of uniform causal attention over the same queries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llm_dir))
    llm = AutoModelForCausalLM.from_pretrained(str(llm_dir)).eval()
    _eager(llm)
    ent, uni = [], []
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        n = ids.shape[1]
        q = torch.arange(n // 2, n)
        with torch.no_grad():
            att = llm(input_ids=ids, output_attentions=True).attentions
        ent.append([float(-(a[0][:, q] * a[0][:, q].clamp_min(1e-12).log()).sum(-1).mean()) for a in att])
        uni.append(float(torch.log((q + 1).double()).mean()))
    return {"entropy": np.mean(ent, axis=0).round(2).tolist(), "uniform": round(float(np.mean(uni)), 2)}


def run(results: Path, experiment: str, volumes: int) -> dict:
    import pandas as pd

    from model.data import build_dataset
    from model.network import MedRegionCT
    from model.prompt import format_structured
    from pipeline.constants import REGIONS

    model_dir = results / "experiments" / experiment / "stage2"
    if not (model_dir / "medregion_config.json").exists():
        sys.exit(f"{model_dir}: no trained stage-2 model (run the demo through train_stage2 first)")
    model = MedRegionCT.from_pretrained(model_dir)
    feats, attrs = model_inputs(results)
    cfg = model.config
    ds = build_dataset(feats, attrs, results / "reports" / "train.parquet", model.tokenizer, stage=2,
                       use_mask_tokens=cfg.prompt_uses_masks, use_attributes=cfg.prompt_uses_attributes,
                       n_vision=cfg.n_vision)
    parts = attention_by_part(model, ds, list(range(min(volumes, len(ds)))))
    parts = {**parts, "mass": np.round(parts["mass"], 4).tolist(), "share": np.round(parts["share"], 4).tolist()}
    train = pd.read_parquet(results / "reports" / "train.parquet").head(volumes)
    texts = [format_structured(r) for r in train[list(REGIONS)].fillna("").to_dict("records")]
    return {"results": str(results), "volumes": min(volumes, len(ds)), "stage2_attention_by_part": parts,
            "base_lm": lm_attention_entropy(Path(cfg.llm_path), texts)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, nargs="+", required=True, help="results folder(s) of finished demo runs")
    ap.add_argument("--experiment", default="full")
    ap.add_argument("--volumes", type=int, default=16, help="training volumes whose reports are the queries")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.volumes < 1:
        ap.error(f"--volumes must be >= 1, got {args.volumes}")
    out = [run(r, args.experiment, args.volumes) for r in args.results]
    for res in out:
        p = res["stage2_attention_by_part"]
        print(f"\n{res['results']} ({res['volumes']} training volumes, {p['report_tokens']} report tokens)")
        print("attention mass / share of the visible positions (uniform = share), per layer:")
        print("layer  " + "  ".join(f"{name:>22s}" for name in PARTS))
        for layer, row in enumerate(p["mass"]):
            cells = [f"{m:.3f} / {s:.3f} ({m / s:.2f}x)" if s else "-" for m, s in zip(row, p["share"])]
            print(f"{layer:5d}  " + "  ".join(f"{c:>22s}" for c in cells))
        lm = res["base_lm"]
        print(f"base LM attention entropy per layer {lm['entropy']} nats, uniform {lm['uniform']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
