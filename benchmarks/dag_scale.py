"""Dry-run the workflow on a 25,000-volume RadGenome-shaped cohort: DAG size and planning time.

    python benchmarks/dag_scale.py [--volumes 25000] [--shard-size 250]

No image data is needed: a report CSV lists the volumes, the encoder / LLM folders are empty
placeholders. Prints the job count per rule and the wall time of `snakemake -n all`.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]


def write_cohort(root: Path, n_volumes: int, shard_size: int) -> Path:
    """A report CSV of `n_volumes` CT-RATE ids and a config pointing the workflow at it."""
    ids = [f"train_{i // 2}_{'ab'[i % 2]}_1" for i in range(n_volumes)]
    pd.DataFrame({"VolumeName": [f"{v}.nii.gz" for v in ids], "Findings_EN": "No finding.",
                  "Impressions_EN": ""}).to_csv(root / "reports.csv", index=False)
    for folder in ("encoder", "llm", "volumes", "masks"):
        (root / folder).mkdir(exist_ok=True)
    config = yaml.safe_load((REPO / "config" / "radgenome.yaml").read_text(encoding="utf-8"))
    config["results"] = str(root / "results")
    config["shard_size"] = shard_size
    config["dataset"].update(volumes_dir=str(root / "volumes"), masks_dir=str(root / "masks"),
                             reports_csv=[str(root / "reports.csv")], region_report_csv=[], labels_csv=[])
    config["features"]["encoder"]["path"] = str(root / "encoder")
    config["llm"]["path"] = str(root / "llm")
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def dry_run(root: Path, config: Path) -> tuple[float, dict[str, int]]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(root),
                           "--configfile", str(config), "-n", "--quiet", "rules", "all"],
                          capture_output=True, encoding="utf-8", errors="replace")
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    counts: dict[str, int] = collections.OrderedDict()
    for line in proc.stdout.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return wall, counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--volumes", type=int, default=25_000)
    ap.add_argument("--shard-size", type=int, default=250)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        wall, counts = dry_run(root, write_cohort(root, args.volumes, args.shard_size))
    shards = -(-args.volumes // args.shard_size)
    print(f"{args.volumes} volumes, shard size {args.shard_size} -> {shards} shards")
    for rule, n in counts.items():
        print(f"  {rule:<16}{n:>6}")
    print(f"jobs: {sum(counts.values())}   snakemake -n all: {wall:.1f} s")


if __name__ == "__main__":
    main()
