"""`python -m pipeline.regions`: the command line of the regions stage (see `pipeline.regions`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from pipeline.regions.stage import RegionsSettings, run_shard
from pipeline.regions.table import LabelTable
from pipeline.stage_config import settings_from_cli


def main(argv: Sequence[str] | None = None) -> None:
    import pipeline.regions

    ap = argparse.ArgumentParser(prog="python -m pipeline.regions", description=pipeline.regions.__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True, help="the cohort manifest (.parquet)")
    ap.add_argument("--shard", type=int, required=True, help="the shard whose volumes are merged")
    ap.add_argument("--table", type=Path, required=True, help="the label table (config/regions.yaml)")
    ap.add_argument("--segment", type=Path,
                    help="the segment stage's table for this shard (mask locations); without it, the manifest's "
                         "mask_dir / mask_label_names")
    ap.add_argument("--out", type=Path, required=True, help="the shard's masks store (shard-<k>.zarr)")
    ap.add_argument("--qc", type=Path, required=True, help="the shard's QC table (.parquet), one row per volume")
    ap.add_argument("--pictures", type=Path, help="folder for the QC pictures of the sampled volumes")
    ap.add_argument("--params-json", default="{}",
                    help='RegionsSettings as JSON: {"qc_pictures": int, "decoder": "auto|sparse|libdeflate|zlib", '
                         '"memory_cap_gb": number}; missing keys take the schema defaults (1, auto, 8)')
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a bad volume stops the job (fail) or is recorded in the QC table (skip)")
    ap.add_argument("--threads", type=int, default=1, help="threads of this job (structure files decoded in parallel)")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, RegionsSettings, args.params_json, section="regions")
    manifest = pd.read_parquet(args.manifest)
    segment = pd.read_parquet(args.segment) if args.segment else None
    qc = run_shard(manifest, args.shard, LabelTable.load(args.table), args.out, args.qc, args.on_error,
                   args.threads, segment, args.pictures, settings.qc_pictures, settings.memory_cap_gb,
                   settings.decoder)
    print(json.dumps(qc["status"].value_counts().to_dict()))
