"""Generate region reports with a trained MedRegion-CT folder (greedy decoding).

    python -m model.generate --model results/experiments/full/stage2 \\
        --features results/features/enc/shard-*.zarr --attributes results/attributes/shard-*.parquet \\
        --reports results/reports/test.parquet --out results/experiments/full/predictions.parquet

Settings: `--params-json` (the config's `generate` section, `GenerateSettings`): greedy by default;
`num_beams` > 1 for beam search, `do_sample` (with `temperature`, `top_p`, `seed`) for sampling.

Output parquet: volume_id, the six region columns, `report` (non-empty region texts merged in region
order), `raw` (the generated text) and the degenerate-output columns (`pipeline.evaluate.degenerate`:
empty / duplicated / repeated sections, `degenerate`). Written to a temporary name and renamed
into place. A section that is missing from the generated text is an empty region text; the log counts
them per region, and counts texts with no section header at all and sections written more than once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.constants import REGIONS
from pipeline.stage_config import settings_from_cli


def generate_texts(
    model,
    ds,
    indices: list[int] | None = None,
    batch_size: int = 4,
    max_new_tokens: int = 256,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
    **decoding,
) -> dict[str, str]:
    """Generated text per volume id for the items `indices` (default: all) of a prompt-only dataset
    (`build_dataset(..., with_targets=False)`). Prompts of similar length are batched together (left
    padding); `decoding` goes to `MedRegionCT.generate` (num_beams, do_sample, temperature, top_p).
    `autocast_dtype` (e.g. bf16 on a GPU) runs the decoding under autocast."""
    from tqdm.auto import tqdm

    from model.data import Collator

    indices = list(range(len(ds))) if indices is None else list(indices)
    collate = Collator(model.tokenizer.pad_token_id, padding_side="left")
    order = sorted(indices, key=lambda i: -ds.lengths[i])
    device = next(model.connector.parameters()).device
    raw: dict[str, str] = {}
    steps = range(0, len(order), batch_size)
    for s in tqdm(steps, desc="generate", disable=not progress or len(order) <= batch_size):
        batch = collate([ds[i] for i in order[s : s + batch_size]])
        with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.bfloat16,
                            enabled=autocast_dtype is not None):
            texts = model.generate(batch, max_new_tokens=max_new_tokens, **decoding)
        raw.update(zip(batch["volume_ids"], texts))
    return raw


def predict(
    model_dir: str | Path,
    features: list[str],
    attributes: list[str],
    reports: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 4,
    device: str | None = None,
    num_beams: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    skipped: Collection[str] = (),
):
    import pandas as pd

    from model.data import build_dataset
    from model.network import MedRegionCT
    from model.prompt import merge_regions, parse_structured

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    model = MedRegionCT.from_pretrained(model_dir, dtype=dtype, device=device)
    cfg = model.config
    ds = build_dataset(
        features,
        attributes,
        reports,
        model.tokenizer,
        stage=cfg.stage,
        use_mask_tokens=cfg.prompt_uses_masks,
        use_attributes=cfg.prompt_uses_attributes,
        n_vision=cfg.n_vision,
        max_length=cfg.max_length,
        with_targets=False,
        skipped=skipped,
    )
    torch.manual_seed(seed)
    raw = generate_texts(
        model, ds, batch_size=batch_size, max_new_tokens=max_new_tokens, num_beams=num_beams,
        do_sample=do_sample, temperature=temperature, top_p=top_p, progress=True, autocast_dtype=dtype,
    )
    rows = []
    for vid in ds.volume_ids:
        text = raw[vid]
        regions = parse_structured(text) if cfg.stage == 2 else {r: "" for r in REGIONS}
        report = merge_regions(regions) if cfg.stage == 2 else text
        rows.append({"volume_id": vid, **regions, "report": report, "raw": text})
    return pd.DataFrame(rows, columns=["volume_id", *REGIONS, "report", "raw"])


def section_counts(df) -> dict:
    """Missing sections per region, texts without any header, and sections written more than once."""
    from model.prompt import _HEADER_RE

    no_header = repeated = 0
    for text in df["raw"]:
        heads = [m.group(1).lower() for m in _HEADER_RE.finditer(text or "")]
        no_header += not heads
        repeated += len(heads) - len(set(heads))
    return {
        "volumes": len(df),
        "empty_sections": {r: int((df[r].str.strip() == "").sum()) for r in REGIONS},
        "texts_without_any_section": int(no_header),
        "repeated_sections": int(repeated),
    }


@dataclass(frozen=True)
class GenerateSettings:
    """Decoding settings: the config's `generate` section. Greedy by default; beam search with
    num_beams > 1; do_sample samples with temperature / top_p, seeded by seed."""

    max_new_tokens: int = 256
    batch_size: int = 4
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder written by model.train (medregion_config.json)")
    ap.add_argument("--features", nargs="+", required=True, help="the experiment's feature shards (.zarr)")
    ap.add_argument("--attributes", nargs="*", default=[], help="the attribute tables (.parquet)")
    ap.add_argument("--reports", required=True, help="parquet whose volume_id column lists the volumes")
    ap.add_argument("--out", required=True, help="predictions.parquet to write")
    ap.add_argument("--params-json", default="{}",
                    help='GenerateSettings as JSON (the `generate` section), e.g. \'{"max_new_tokens": 256, "num_beams": 1}\'')
    ap.add_argument("--device", default=None, help="torch device (default: cuda when present)")
    ap.add_argument("--skipped-qc", nargs="*", default=[],
                    help="QC tables of the data stages: the volumes they skipped get no prediction (pipeline.skipped)")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, GenerateSettings, args.params_json, section="generate")
    from pipeline.skipped import skipped_volumes

    df = predict(
        args.model,
        args.features,
        args.attributes,
        args.reports,
        settings.max_new_tokens,
        settings.batch_size,
        args.device,
        num_beams=settings.num_beams,
        do_sample=settings.do_sample,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=settings.seed,
        skipped=skipped_volumes(args.skipped_qc).ids,
    )
    from pipeline.evaluate.degenerate import degeneracy_columns, degenerate_block

    df = df.join(degeneracy_columns(df))  # empty / duplicated / repeated sections and the flag, per volume
    from pipeline.io import write_parquet

    out = Path(args.out)
    write_parquet(df, out)  # atomic: a temporary sibling renamed into place
    import json

    print(json.dumps({"sections": section_counts(df), "degenerate": degenerate_block(df)["note"]}), file=sys.stderr)
    print(f"{len(df)} predictions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
