"""Generate region reports with a trained MedRegion-CT folder (greedy decoding).

    python -m model.generate --model results/experiments/full/stage2 \\
        --features results/features/enc/shard-*.zarr --attributes results/attributes/shard-*.parquet \\
        --reports results/reports/test.parquet --out results/experiments/full/predictions.parquet

Output parquet: volume_id, the six region columns, `report` (non-empty region texts merged in region
order) and `raw` (the generated text). Written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pipeline.constants import REGIONS


def predict(
    model_dir: str | Path,
    features: list[str],
    attributes: list[str],
    reports: str | Path,
    max_new_tokens: int = 256,
    batch_size: int = 4,
    device: str | None = None,
):
    import pandas as pd
    from tqdm.auto import tqdm

    from model.data import Collator, build_dataset
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
    )
    collate = Collator(model.tokenizer.pad_token_id, padding_side="left")
    # similar prompt lengths together; results are put back in report order
    order = sorted(range(len(ds)), key=lambda i: -ds.lengths[i])
    raw: dict[str, str] = {}
    for s in tqdm(range(0, len(order), batch_size), desc="generate", disable=len(order) <= batch_size):
        items = [ds[i] for i in order[s : s + batch_size]]
        batch = collate(items)
        with torch.autocast(
            device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=dtype is not None
        ):
            texts = model.generate(batch, max_new_tokens=max_new_tokens)
        raw.update(zip(batch["volume_ids"], texts))
    rows = []
    for vid in ds.volume_ids:
        text = raw[vid]
        regions = parse_structured(text) if cfg.stage == 2 else {r: "" for r in REGIONS}
        report = merge_regions(regions) if cfg.stage == 2 else text
        rows.append({"volume_id": vid, **regions, "report": report, "raw": text})
    return pd.DataFrame(rows, columns=["volume_id", *REGIONS, "report", "raw"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder written by model.train (medregion_config.json)")
    ap.add_argument("--features", nargs="+", required=True)
    ap.add_argument("--attributes", nargs="*", default=[])
    ap.add_argument("--reports", required=True, help="parquet whose volume_id column lists the volumes")
    ap.add_argument("--out", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    df = predict(
        args.model,
        args.features,
        args.attributes,
        args.reports,
        args.max_new_tokens,
        args.batch_size,
        args.device,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, out)
    print(f"{len(df)} predictions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
