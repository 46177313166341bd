"""Time the demo workflow from a clean directory, then check that a second invocation does nothing.

    python benchmarks/demo_workflow.py [--cores 2] [--workdir DIR] [--keep]

Prints the wall time of `snakemake --cores N all` on the default (demo) config, the per-rule time
from Snakemake's benchmark files (sum and median over jobs), and the dry run of a second invocation.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="medregion-demo-"))
    base = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir),
            "--cores", str(args.cores)]
    t0 = time.perf_counter()
    subprocess.run([*base, "all"], check=True, capture_output=True)
    wall = time.perf_counter() - t0
    print(f"demo workflow, clean directory, --cores {args.cores}: {wall / 60:.1f} min ({wall:.0f} s)")

    per_rule: dict[str, list[float]] = defaultdict(list)
    for tsv in (workdir / "results" / "benchmarks").rglob("*.tsv"):
        rule = tsv.parent.name if tsv.parent.name != "benchmarks" else tsv.stem
        per_rule[rule].append(float(pd.read_csv(tsv, sep="\t")["s"].iloc[0]))
    print(f"{'rule':<16}{'jobs':>5}{'sum s':>9}{'median s':>10}")
    for rule, secs in sorted(per_rule.items(), key=lambda kv: -sum(kv[1])):
        print(f"{rule:<16}{len(secs):>5}{sum(secs):>9.1f}{statistics.median(secs):>10.1f}")

    second = subprocess.run([*base, "all", "--dry-run"], capture_output=True, encoding="utf-8", errors="replace")
    nothing = "Nothing to be done" in second.stdout + second.stderr
    print(f"second invocation: {'nothing to be done' if nothing else 'WOULD RUN JOBS'}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir)
    sys.exit(0 if nothing else 1)


if __name__ == "__main__":
    main()
