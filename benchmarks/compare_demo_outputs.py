"""Are two runs' outputs the same? Compares two `results/` folders file by file, by content.

Used to check that a restructuring of the code changed no output: run the demo with the old code
into one folder and with the new code into another, then

    python benchmarks/compare_demo_outputs.py OLD/results NEW/results

Parquet tables are compared as tables (same columns, dtypes and values), Zarr stores array by array
(values, shapes, dtypes) and by their attributes, JSON by value, everything else byte for byte. What
runs can legitimately differ in is left out and listed: Snakemake's bookkeeping, rule logs and
benchmark timings, the per-run timing fields named in TIMING_KEYS, process ids and host names, and
the order of lists their writer keeps in no order (UNORDERED_KEYS). Prints one line per
category and every difference; exits 1 if any compared output differs or exists on one side only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

# Folders whose contents describe the run, not its results (timings, logs, Snakemake's own markers).
RUN_RECORD_DIRS = ("logs", "benchmarks")
RUN_RECORD_NAMES = (".snakemake_timestamp",)
# Keys / columns that hold wall-clock measurements or dates (compared nowhere).
TIMING_KEYS = ("seconds", "elapsed", "duration", "timestamp", "created", "started", "finished")
TIMING_SUFFIXES = ("_s",)  # wall_s, loop_s, tokens_per_s
# Keys that name the process or machine a run had, not what it computed.
RUN_IDENTITY_KEYS = ("pid", "host")
# Lists that their writer stores in no fixed order (PEFT writes LoRA's target_modules from a set).
UNORDERED_KEYS = ("target_modules",)


def is_timing_key(name: str) -> bool:
    lower = name.lower()
    return (any(k in lower for k in TIMING_KEYS) or lower.endswith(TIMING_SUFFIXES)
            or lower in RUN_IDENTITY_KEYS)


def output_items(root: Path) -> dict[str, Path]:
    """Relative name -> path of every output: Zarr stores as one item, files otherwise."""
    items: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if rel.parts[0] in RUN_RECORD_DIRS or path.name in RUN_RECORD_NAMES:
            continue
        if any(p.endswith(".zarr") for p in rel.parts[:-1]):
            continue  # inside a store: compared with the store
        if path.is_dir() and not path.name.endswith(".zarr"):
            continue
        items[rel.as_posix()] = path
    return items


def differences_parquet(a: Path, b: Path) -> list[str]:
    ta, tb = pd.read_parquet(a), pd.read_parquet(b)
    if list(ta.columns) != list(tb.columns):
        return [f"columns {list(ta.columns)} != {list(tb.columns)}"]
    if len(ta) != len(tb):
        return [f"{len(ta)} rows != {len(tb)} rows"]
    out = []
    for col in ta.columns:
        if is_timing_key(col):
            continue
        if ta[col].dtype != tb[col].dtype:
            out.append(f"column {col}: dtype {ta[col].dtype} != {tb[col].dtype}")
        elif not ta[col].astype(str).equals(tb[col].astype(str)):  # exact, NaN-safe, nested values too
            n = int((ta[col].astype(str) != tb[col].astype(str)).sum())
            out.append(f"column {col}: {n} of {len(ta)} values differ")
    return out


def _plain(value: Any) -> Any:
    """JSON-like value with timing keys dropped and NaN made comparable."""
    if isinstance(value, dict):
        return {k: sorted(map(str, v)) if k in UNORDERED_KEYS and isinstance(v, list) else _plain(v)
                for k, v in value.items() if not is_timing_key(str(k))}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    return value


def differences_json(a: Path, b: Path) -> list[str]:
    va, vb = _plain(json.loads(a.read_text(encoding="utf-8"))), _plain(json.loads(b.read_text(encoding="utf-8")))
    if va == vb:
        return []
    if isinstance(va, dict) and isinstance(vb, dict):
        keys = sorted(k for k in set(va) | set(vb) if va.get(k) != vb.get(k))
        return [f"keys differ: {', '.join(map(str, keys))}"]
    return ["values differ"]


def differences_jsonl(a: Path, b: Path) -> list[str]:
    """One JSON record per line (training logs): compared record by record, timings left out."""
    ra, rb = (a.read_text(encoding="utf-8").splitlines(), b.read_text(encoding="utf-8").splitlines())
    if len(ra) != len(rb):
        return [f"{len(ra)} records != {len(rb)} records"]
    bad = [i for i, (x, y) in enumerate(zip(ra, rb)) if _plain(json.loads(x)) != _plain(json.loads(y))]
    return [f"{len(bad)} of {len(ra)} records differ (first: line {bad[0] + 1})"] if bad else []


def differences_zarr(a: Path, b: Path) -> list[str]:
    import zarr

    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    out = []
    if _plain(dict(ga.attrs)) != _plain(dict(gb.attrs)):
        keys = sorted(k for k in set(ga.attrs) | set(gb.attrs) if ga.attrs.get(k) != gb.attrs.get(k))
        out.append(f"attributes differ: {', '.join(keys)}")
    names_a, names_b = sorted(ga.array_keys()), sorted(gb.array_keys())
    if names_a != names_b:
        return out + [f"arrays {names_a} != {names_b}"]
    for name in names_a:
        xa, xb = ga[name], gb[name]
        if xa.shape != xb.shape or xa.dtype != xb.dtype:
            out.append(f"array {name}: {xa.shape} {xa.dtype} != {xb.shape} {xb.dtype}")
        elif not np.array_equal(xa[...], xb[...], equal_nan=True):
            out.append(f"array {name}: values differ")
        elif _plain(dict(xa.attrs)) != _plain(dict(xb.attrs)):
            out.append(f"array {name}: attributes differ")
    for name in sorted(ga.group_keys()):
        out += [f"{name}/{d}" for d in differences_zarr(a / name, b / name)]
    return out


def differences_bytes(a: Path, b: Path) -> list[str]:
    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    return [] if digest(a) == digest(b) else ["bytes differ"]


def kind(name: str) -> str:
    if name.endswith(".zarr"):
        return "zarr"
    suffix = Path(name).suffix
    return {".parquet": "parquet", ".json": "json", ".jsonl": "jsonl"}.get(suffix, suffix.lstrip(".") or "other")


def compare(old: Path, new: Path) -> tuple[Counter, Counter, list[str]]:
    """(equal per kind, different per kind, messages)."""
    items_a, items_b = output_items(old), output_items(new)
    equal, different, messages = Counter(), Counter(), []
    for name in sorted(set(items_a) | set(items_b)):
        k = kind(name)
        if name not in items_b or name not in items_a:
            different[k] += 1
            messages.append(f"{name}: only in {'old' if name in items_a else 'new'}")
            continue
        check = {"parquet": differences_parquet, "json": differences_json, "jsonl": differences_jsonl,
                 "zarr": differences_zarr}.get(k, differences_bytes)
        diffs = check(items_a[name], items_b[name])
        if diffs:
            different[k] += 1
            messages += [f"{name}: {d}" for d in diffs]
        else:
            equal[k] += 1
    return equal, different, messages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/compare_demo_outputs.py", description=__doc__.split("\n")[0])
    parser.add_argument("old", type=Path, help="results folder of the reference run")
    parser.add_argument("new", type=Path, help="results folder of the run to check")
    args = parser.parse_args(argv)
    equal, different, messages = compare(args.old, args.new)
    print(f"{'kind':<10}{'equal':>8}{'different':>11}")
    for k in sorted(set(equal) | set(different)):
        print(f"{k:<10}{equal[k]:>8}{different[k]:>11}")
    print(f"{'all':<10}{sum(equal.values()):>8}{sum(different.values()):>11}")
    print(f"(left out: {', '.join(RUN_RECORD_DIRS)}/ and {', '.join(RUN_RECORD_NAMES)}; fields named like "
          f"{', '.join(TIMING_KEYS)} or ending in {', '.join(TIMING_SUFFIXES)}; {', '.join(RUN_IDENTITY_KEYS)})")
    for m in messages:
        print("DIFF", m)
    return 1 if different else 0


if __name__ == "__main__":
    sys.exit(main())
