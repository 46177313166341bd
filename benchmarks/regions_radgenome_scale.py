"""Regions + attributes on one RadGenome-size volume (360 x 300 x 110 voxels, 210 structure files).

Measures, in one process and interleaved (repeat k runs every variant once, so load on a shared
machine hits all of them alike), the median over the repeats of:
  floor   decompressing the 210 files and nothing else, with the fastest standard decoder:
          SimpleITK (ReadImage), libdeflate (the `deflate` package) into fresh bytes, and libdeflate
          into a reused buffer; each on 1 thread and on --threads threads; the floor is the fastest
          of these six. Also timed and printed beside it: the regions stage's own sparse inflater
          (pipeline/_sparse_gunzip.c) alone on all 210 files, which skips writing zero runs and so
          beats every standard decoder
  plain   SimpleITK read of each structure file in turn, OR-ing `a > 0` into each channel it maps to
  ours    the regions stage (`pipeline.regions.run_shard`: merge, Zarr write, QC table) followed by
          the attributes stage (`pipeline.attributes.run_shard`) on --threads threads (and, for
          comparison, on 1 thread: "ours 1t")
and the peak resident memory (VmHWM) of `ours` alone, run in a fresh subprocess (interpreter and
imports included). Checks that `ours` and `plain` produce the same channels.

    python benchmarks/regions_radgenome_scale.py [--repeats 5] [--threads 2] [--case DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import attributes, io, regions  # noqa: E402
from pipeline.constants import CHANNELS  # noqa: E402
from pipeline.demo.radgenome_scale import VOLUME_ID, write_radgenome_scale_case  # noqa: E402

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")


def _map(fn, items, threads):
    if threads <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def floor_sitk(files, threads):
    _map(lambda p: sitk.ReadImage(str(p)), files, threads)


def floor_deflate_bytes(files, threads):
    import deflate

    _map(lambda p: deflate.gzip_decompress(p.read_bytes()), files, threads)


def floor_deflate_reused(files, threads):
    def one(p):
        data = p.read_bytes()
        size = int.from_bytes(data[-4:], "little")
        io.inflate_into(data, size, p, VOLUME_ID)

    _map(one, files, threads)


def floor_sparse(files, threads):
    """The sparse inflater (pipeline/_sparse_gunzip.c) of the regions stage, on every file: it, too,
    yields each file's full contents (in a zeroed buffer), so it counts as a decoder for the floor."""
    local = threading.local()

    def one(p):
        data = p.read_bytes()
        hdr = io.parse_nifti_header(zlib.decompressobj(31).decompress(data[:8192], 352))
        inflater = getattr(local, "inflater", None)
        if inflater is None:
            inflater = local.inflater = io.SparseInflater()
        inflater.inflate(data, hdr.nbytes, hdr.vox_offset, hdr.dims[::-1], p, VOLUME_ID)

    _map(one, files, threads)


def plain(ct: Path, files) -> dict[str, np.ndarray]:
    """The plain approach: read each structure file with SimpleITK, OR it into its channels."""
    shape = sitk.ReadImage(str(ct)).GetSize()[::-1]
    out = {c: np.zeros(shape, bool) for c in CHANNELS}
    for path in files:
        name = regions.structure_name(path)
        if TABLE.classify(name) != "used":
            continue
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        for c in regions.channel_names(TABLE.bits[name]):
            out[c] |= a > 0
    return out


def ours(case: Path, work: Path, threads: int) -> Path:
    manifest = pd.DataFrame({"volume_id": [VOLUME_ID], "shard": [0],
                             "ct_path": [str(case / "volumes" / f"{VOLUME_ID}.nii.gz")],
                             "mask_dir": [str(case / "masks" / f"seg_{VOLUME_ID}")]})
    masks = work / "masks.zarr"
    regions.run_shard(manifest, 0, TABLE, masks, work / "qc.parquet", threads=threads)
    attributes.run_shard(masks, work / "attributes.parquet", threads=threads)
    return masks


def peak_rss_of_ours(case: Path, threads: int) -> float:
    """Peak RSS (MiB, the kernel's VmHWM) of a fresh interpreter that runs only `ours`."""
    code = ("import sys, tempfile, pathlib; sys.path.insert(0, {repo!r});"
            "import benchmarks.regions_radgenome_scale as b;"
            "d = pathlib.Path(tempfile.mkdtemp()); b.ours(pathlib.Path({case!r}), d, {threads});"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    code = code.format(repo=str(REPO), case=str(case), threads=threads)
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, capture_output=True,
                         encoding="utf-8", errors="replace")
    return int(out.stdout.strip().splitlines()[-1]) / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--case", type=Path, help="an existing case folder (default: generate one in a temp dir)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    args = ap.parse_args()
    import logging

    logging.disable(logging.INFO)
    tmp = Path(tempfile.mkdtemp(prefix="rg-scale-"))
    case = args.case or write_radgenome_scale_case(tmp / "case")
    ct = case / "volumes" / f"{VOLUME_ID}.nii.gz"
    files = regions.structure_files(case / "masks" / f"seg_{VOLUME_ID}", VOLUME_ID)
    info = json.loads((case / "case.json").read_text(encoding="utf-8"))
    n_used = sum(TABLE.classify(regions.structure_name(p)) == "used" for p in files)
    print(f"case: {info['size_xyz']} voxels at {info['spacing_xyz']} mm, {len(files)} structure files "
          f"({info['n_non_empty']} non-empty, {n_used} used by the table), "
          f"{sum(p.stat().st_size for p in files) / 2**20:.1f} MiB of .nii.gz; decoder {io.gzip_decoder_name()}; "
          f"{args.threads} threads; {os.cpu_count()} cpus; load {os.getloadavg()[0]:.1f}")

    T = args.threads
    variants = {
        "floor sitk 1t": lambda: floor_sitk(files, 1),
        f"floor sitk {T}t": lambda: floor_sitk(files, T),
        "floor libdeflate 1t": lambda: floor_deflate_bytes(files, 1),
        f"floor libdeflate {T}t": lambda: floor_deflate_bytes(files, T),
        "floor libdeflate-reused 1t": lambda: floor_deflate_reused(files, 1),
        f"floor libdeflate-reused {T}t": lambda: floor_deflate_reused(files, T),
        **({"floor sparse 1t": lambda: floor_sparse(files, 1),
            f"floor sparse {T}t": lambda: floor_sparse(files, T)} if io.SparseInflater.available() else {}),
        "plain": lambda: plain(ct, files),
        "ours": lambda: ours(case, Path(tempfile.mkdtemp(dir=tmp)), T),
        **({"ours 1t": lambda: ours(case, Path(tempfile.mkdtemp(dir=tmp)), 1)} if T > 1 else {}),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():  # warm the page cache and imports once
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}

    # correctness: ours == plain, channel by channel
    import zarr

    reference = plain(ct, files)
    labels = zarr.open_group(str(ours(case, Path(tempfile.mkdtemp(dir=tmp)), T)), mode="r")[VOLUME_ID][...]
    same = all((regions.unpack_channel(labels, c) == reference[c]).all() for c in CHANNELS)

    peak = max(peak_rss_of_ours(case, T) for _ in range(2))
    floor_name = min((k for k in med if k.startswith("floor") and "sparse" not in k), key=lambda k: med[k])
    floor = med[floor_name]
    sitk_floor = min(med["floor sitk 1t"], med[f"floor sitk {T}t"])
    sparse = {k: v for k, v in med.items() if k.startswith("floor sparse")}
    sparse_name = min(sparse, key=sparse.get) if sparse else None
    print(f"\nmedian of {args.repeats} interleaved repeats (min in brackets), seconds:")
    for k, v in med.items():
        print(f"  {k:32s} {v:7.3f}  [{min(times[k]):.3f}]")
    print(f"\nfloor (fastest standard decoder: {floor_name}): {floor:.3f} s")
    print(f"plain (SimpleITK read + OR per file):  {med['plain']:.3f} s")
    print(f"ours  (regions + attributes stages):   {med['ours']:.3f} s"
          + (f"  (on 1 thread {med['ours 1t']:.3f} s)" if "ours 1t" in med else ""))
    print(f"peak memory of ours (fresh process):   {peak:.0f} MiB")
    print(f"ours / floor       = {med['ours'] / floor:.2f}  (target <= 1.3)")
    print(f"ours / SimpleITK floor = {med['ours'] / sitk_floor:.2f}")
    if sparse_name:
        print(f"ours / sparse inflater alone on all files ({sparse_name}, {med[sparse_name]:.3f} s) = "
              f"{med['ours'] / med[sparse_name]:.2f}")
    print(f"plain / ours       = {med['plain'] / med['ours']:.2f}  (target >= 3)")
    print(f"ours == plain on every channel: {same}")
    result = {"median_s": med, "all_s": times, "floor_variant": floor_name, "floor_s": floor,
              "plain_s": med["plain"], "ours_s": med["ours"], "peak_rss_mib": peak,
              "ours_over_floor": med["ours"] / floor, "ours_over_sitk_floor": med["ours"] / sitk_floor,
              "plain_over_ours": med["plain"] / med["ours"], "same_channels": same, "threads": T,
              "sparse_floor_variant": sparse_name, "sparse_floor_s": med[sparse_name] if sparse_name else None,
              "ours_over_sparse_floor": med["ours"] / med[sparse_name] if sparse_name else None,
              "cpus": os.cpu_count(), "decoder": io.gzip_decoder_name()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if not same:
        sys.exit("ours and plain differ")


if __name__ == "__main__":
    main()
