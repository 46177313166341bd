"""Shared set-up of the train_* benchmarks: the inputs of a finished demo run (features, attributes,
reports, demo LM, stage-1 folder) and the trainer's own dataset / model construction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def demo_inputs(results: Path, experiment: str = "full") -> dict:
    """Paths of a demo run's training inputs (`snakemake --cores 2 all` writes them under results/)."""
    results = Path(results)
    feats = sorted((results / "features").glob("*/shard-*.zarr"))
    tags = sorted({p.parent.name for p in feats})
    if not feats:
        raise SystemExit(f"{results}: no feature shards; run the demo first (snakemake --cores 2 all)")
    tag = next((t for t in tags if t.endswith("-r2")), tags[0])
    cfg = results / "experiments" / experiment / "stage1" / "medregion_config.json"
    llm = json.loads(cfg.read_text(encoding="utf-8"))["llm_path"] if cfg.exists() else None
    if llm is not None and not Path(llm).is_absolute():
        llm = str((cfg.parent / llm).resolve())
    if llm is None or not Path(llm).exists():
        llm = str(results / "demo" / "models" / "llm")
    return {
        "features": [str(p) for p in sorted((results / "features" / tag).glob("shard-*.zarr"))],
        "attributes": [str(p) for p in sorted((results / "attributes").glob("shard-*.parquet"))],
        "train": str(results / "reports" / "train.parquet"),
        "val": str(results / "reports" / "validation.parquet"),
        "test": str(results / "reports" / "test.parquet"),
        "llm": llm,
        "stage1": str(cfg.parent) if cfg.exists() else None,
    }


def trainer_args(inp: dict, stage: int, out: Path, params: dict, init: bool = True) -> list[str]:
    args = ["--stage", str(stage), "--params-json", json.dumps(params), "--features", *inp["features"],
            "--attributes", *inp["attributes"], "--train-reports", inp["train"], "--val-reports", inp["val"],
            "--llm", inp["llm"], "--out", str(out)]
    if stage == 2 and init and inp["stage1"]:
        args += ["--init", inp["stage1"]]
    return args


def build_model_and_data(inp: dict, stage: int, params: dict, reports: str | None = None):
    """Model and training dataset exactly as model.train builds them (same seed, same config)."""
    import torch
    from accelerate.utils import set_seed

    from model.data import build_dataset
    from model.network import WEIGHTS_NAME, MedRegionCT
    from model.train import network_config, resolve_params
    from pipeline.feature_store import FeatureStore

    p = resolve_params(stage, json.dumps(params))
    set_seed(p["seed"])
    store = FeatureStore(inp["features"])
    config = network_config(store, p, inp["llm"], stage)
    model = MedRegionCT.from_config(config, dtype=torch.float32)
    if stage == 2 and inp["stage1"]:
        model.load_own_weights(Path(inp["stage1"]) / WEIGHTS_NAME, strict=False, prefixes=("connector.",))
    ds = build_dataset(inp["features"], inp["attributes"], reports or inp["train"], model.tokenizer, stage=stage,
                       use_mask_tokens=config.prompt_uses_masks, use_attributes=config.prompt_uses_attributes,
                       n_vision=config.n_vision, max_length=p["max_length"], store=store)
    return model, ds, p


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")
