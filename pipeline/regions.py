"""Regions stage: per-structure masks -> one bit-packed uint32 channel array per volume.

Each structure file of `seg_<volume>/` is read once; the label table (`config/regions.yaml`) maps its
name to a uint32 bit word (one bit per channel of `pipeline.constants.CHANNELS`), and the voxels it
covers are OR-ed with that word: one pass per file, whatever the number of channels.

Output `results/masks/shard-<k>.zarr`: array `<volume_id>` (z, y, x) uint32 on the CT's native grid
with attributes spacing / origin / direction; group attributes hold the channel table and the ids.
QC `results/qc/regions/shard-<k>.parquet`: one row per volume (status, unknown names, resampled masks).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
import zarr

from pipeline.constants import CHANNELS
from pipeline.io import InputError, atomic_output, image_array, read_image, setup_logging, write_parquet

MASK_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class LabelTable:
    """Structure name -> channel bit word; names deliberately left out, with their reasons."""

    version: int
    bits: dict[str, int]
    unused: dict[str, str]

    @classmethod
    def load(cls, path: Path | str) -> LabelTable:
        raw = yaml.safe_load(Path(path).read_text())
        channels = tuple(raw["channels"])
        if channels != CHANNELS:
            raise ValueError(f"{path}: channels {channels} differ from pipeline.constants.CHANNELS")
        index = {c: i for i, c in enumerate(channels)}
        bits: dict[str, int] = {}
        for name, chans in raw["structures"].items():
            unknown = [c for c in chans if c not in index]
            if unknown:
                raise ValueError(f"{path}: structure {name!r} maps to unknown channels {unknown}")
            bits[name] = int(sum(1 << index[c] for c in set(chans)))
        unused = {str(k): str(v) for k, v in (raw.get("unused") or {}).items()}
        both = set(bits) & set(unused)
        if both:
            raise ValueError(f"{path}: names both used and unused: {sorted(both)}")
        return cls(int(raw["version"]), bits, unused)

    def classify(self, name: str) -> str:
        if name in self.bits:
            return "used"
        return "unused" if name in self.unused else "unknown"


def unpack_channel(labels: np.ndarray, channel: str) -> np.ndarray:
    """Boolean mask of one channel from the packed array."""
    return (labels >> np.uint32(CHANNELS.index(channel))) & np.uint32(1) == 1


@dataclass
class VolumeMasks:
    labels: np.ndarray
    reference: sitk.Image
    unknown: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    n_files: int = 0


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-4)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def _bounds(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    size = np.array(image.GetSize()) - 1
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in np.array(np.meshgrid(*[[0, s] for s in size])).T.reshape(-1, 3)
    ]
    pts = np.array(corners)
    return pts.min(0), pts.max(0)


def _on_ct_grid(mask: sitk.Image, ct: sitk.Image, path: Path, volume_id: str) -> tuple[sitk.Image, bool]:
    """The mask on the CT grid: as is, or resampled (nearest neighbour) when it overlaps physically."""
    if _same_grid(mask, ct):
        return mask, False
    lo_m, hi_m = _bounds(mask)
    lo_c, hi_c = _bounds(ct)
    if np.any(hi_m < lo_c) or np.any(hi_c < lo_m):
        raise InputError(f"volume {volume_id}: mask {path} does not overlap the CT in physical space")
    return sitk.Resample(mask, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, mask.GetPixelID()), True


def read_ct_header(ct_path: Path, volume_id: str) -> sitk.Image:
    """A zero-voxel stand-in with the CT's geometry, from its header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct_path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"volume {volume_id}: cannot read the header of {ct_path}") from None
    if reader.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {ct_path} is {reader.GetDimension()}D, expected 3D")
    ref = sitk.Image([int(s) for s in reader.GetSize()], sitk.sitkUInt8)
    ref.SetSpacing(reader.GetSpacing())
    ref.SetOrigin(reader.GetOrigin())
    ref.SetDirection(reader.GetDirection())
    return ref


def merge_volume(
    volume_id: str, ct_path: Path, mask_dir: Path, table: LabelTable, threads: int = 1
) -> VolumeMasks:
    """Read every structure file of one volume once and OR its channel word into the packed array."""
    ct = read_ct_header(ct_path, volume_id)
    if not mask_dir.is_dir():
        raise InputError(f"volume {volume_id}: mask folder not found: {mask_dir}")
    files = sorted(p for p in mask_dir.iterdir() if p.name.endswith(MASK_SUFFIX))
    if not files:
        raise InputError(f"volume {volume_id}: no {MASK_SUFFIX} masks in {mask_dir}")
    result = VolumeMasks(np.zeros(ct.GetSize()[::-1], dtype=np.uint32), ct, n_files=len(files))
    used: list[tuple[Path, int]] = []
    for path in files:
        name = path.name[: -len(MASK_SUFFIX)]
        kind = table.classify(name)
        if kind == "unknown":
            result.unknown.append(name)
        elif kind == "used":
            used.append((path, table.bits[name]))

    def load(item: tuple[Path, int]) -> tuple[np.ndarray, int, str | None]:
        path, word = item
        image, moved = _on_ct_grid(read_image(path, volume_id), ct, path, volume_id)
        return image_array(image, path, volume_id) > 0, word, (path.name if moved else None)

    # SimpleITK decodes outside the GIL, so threads overlap the gzip work of several files.
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for mask, word, moved in pool.map(load, used):
            result.labels[mask] |= np.uint32(word)
            if moved:
                result.resampled.append(moved)
    return result


def run_shard(
    manifest: pd.DataFrame,
    shard: int,
    table: LabelTable,
    out_zarr: Path,
    out_qc: Path,
    on_error: str = "fail",
    threads: int = 1,
) -> pd.DataFrame:
    log = setup_logging()
    rows = manifest[manifest["shard"] == shard]
    qc: list[dict[str, object]] = []
    with atomic_output(out_zarr) as tmp:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        done: list[str] = []
        for i, row in enumerate(rows.itertuples(index=False), 1):
            try:
                vm = merge_volume(row.volume_id, Path(row.ct_path), Path(row.mask_dir), table, threads)
            except InputError as exc:
                if on_error != "skip":
                    raise
                log.error("%s (skipped)", exc)
                qc.append({"volume_id": row.volume_id, "status": "error", "message": str(exc),
                           "n_files": 0, "unknown": [], "resampled": []})
                continue
            arr = group.create_array(row.volume_id, shape=vm.labels.shape, chunks=vm.labels.shape,
                                     dtype=np.uint32)
            arr[...] = vm.labels
            ref = vm.reference
            arr.attrs.update({"spacing": list(ref.GetSpacing()), "origin": list(ref.GetOrigin()),
                              "direction": list(ref.GetDirection())})
            done.append(row.volume_id)
            if vm.unknown:
                log.warning("volume %s: %d names not in the label table: %s", row.volume_id,
                            len(vm.unknown), vm.unknown)
            qc.append({"volume_id": row.volume_id, "status": "ok",
                       "message": "resampled to CT grid: " + ", ".join(vm.resampled) if vm.resampled else "",
                       "n_files": vm.n_files, "unknown": vm.unknown, "resampled": vm.resampled})
            log.info("[%d/%d] %s: %d structure files merged", i, len(rows), row.volume_id, vm.n_files)
        group.attrs.update({"channels": list(CHANNELS), "table_version": table.version,
                            "volume_ids": done, "complete": True})
    qc_df = pd.DataFrame(qc, columns=["volume_id", "status", "message", "n_files", "unknown", "resampled"])
    write_parquet(qc_df, out_qc)
    return qc_df


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--table", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--qc", type=Path, required=True)
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    manifest = pd.read_parquet(args.manifest)
    qc = run_shard(manifest, args.shard, LabelTable.load(args.table), args.out, args.qc,
                   args.on_error, args.threads)
    print(json.dumps(qc["status"].value_counts().to_dict()))


if __name__ == "__main__":
    main()
