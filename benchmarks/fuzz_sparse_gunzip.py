"""Benchmark: a longer coverage-guided fuzzing run of the sparse inflater against zlib.

    python benchmarks/fuzz_sparse_gunzip.py [--seconds 600] [--seed 1] [--corpus DIR] [--json OUT]

Builds pipeline/_sparse_gunzip.c with libFuzzer edge coverage, AddressSanitizer and UBSan, runs the
harness of tests/sparse_gunzip_atheris.py (the oracle is zlib; see its docstring) for the given time and
prints the number of executions, executions per second, the edges of the C extension reached (libFuzzer's
`cov`) out of the instrumented total, the corpus kept, and every crash or disagreement (none expected:
each would be a bug to fix and keep as a regression test). Needs clang, libclang-rt-dev and atheris.
A kept corpus (`--corpus`) makes the next run start where this one stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import sparse_gunzip_atheris as harness  # noqa: E402


def instrumented_edges(so: Path) -> int:
    """Edges libFuzzer counts for the module: its inline 8-bit counters section (one byte an edge)."""
    out = subprocess.run(["readelf", "-S", "-W", str(so)], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if "__sancov_cntrs" in line:
            return int(line.split("__sancov_cntrs")[1].split()[3], 16)
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=int, default=600, help="fuzzing time")
    ap.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    ap.add_argument("--corpus", type=Path, help="corpus folder to keep (default: a temporary one)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        so = Path(tmp) / "sg_fuzz.so"
        env = {**os.environ, **dict(kv.split("=", 1) for kv in harness.build(str(so)))}
        corpus = args.corpus or Path(tmp) / "corpus"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(REPO / "tests" / "sparse_gunzip_atheris.py"), str(so),
                               f"-max_total_time={args.seconds}", f"-seed={args.seed}", "-print_final_stats=1",
                               *harness.MEMORY_LIMITS,
                               f"-artifact_prefix={tmp}/", str(corpus)],
                              capture_output=True, text=True, env=env, cwd=tmp)
        wall = time.perf_counter() - start
        total_edges = instrumented_edges(so)
        crashes = sorted(p.name for p in Path(tmp).glob("crash-*"))
        corpus_inputs = len(list(corpus.iterdir())) if corpus.exists() else 0
    err = proc.stderr
    stat = {k: float(v) for k, v in re.findall(r"stat::(\w+):\s+([\d.]+)", err)}
    cov = [int(m) for m in re.findall(r" cov: (\d+)", err)]
    figures = {
        "seconds": round(wall, 1),
        "executions": int(stat.get("number_of_executed_units", 0)),
        "executions_per_second": int(stat.get("average_exec_per_sec", 0)),
        "edges_reached": max(cov) if cov else 0,
        "edges_instrumented": total_edges,
        "corpus_inputs": corpus_inputs,
        "crashes_or_disagreements": crashes,
        "exit_code": proc.returncode,
    }
    print(f"fuzzed {figures['seconds']} s: {figures['executions']:,} executions "
          f"({figures['executions_per_second']:,}/s), edges of the C extension reached "
          f"{figures['edges_reached']} of {figures['edges_instrumented']}, corpus {figures['corpus_inputs']} inputs")
    if proc.returncode != 0 or crashes:
        print("FOUND A CRASH OR A DISAGREEMENT WITH ZLIB:\n" + err[-4000:])
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
