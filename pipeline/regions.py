"""Regions stage: per-structure masks -> one bit-packed uint32 channel array per volume.

Channels (`pipeline.constants.CHANNELS`, bit i = channel i): the 6 regions, the 3 lesions and the 12
attribute structures. The label table `config/regions.yaml` gives each structure name of a vocabulary
(`radgenome` = SAT terms, `totalsegmentator`) its channel bit word.

How a volume is merged
- Each structure file is read exactly once; names the table marks `unused` are not opened at all,
  names it does not know are reported (QC column `unknown`), never silently dropped.
- Masks on the CT's own grid (NIfTI header geometry identical to the CT's) take the fast path: the
  gzip stream is inflated by libdeflate into a reused per-thread buffer (`pipeline.io.inflate_into`),
  checked to hold only 0/1, and only its bounding box is OR-ed into per-thread uint8 accumulators,
  one per byte of the channel word (a lookup of the word's bytes, not a loop over labels or
  channels per voxel). The accumulators are interleaved into the uint32 array at the end. Threads
  decode different files at once (the decoder and numpy release the GIL).
- Any other mask goes through SimpleITK: a mask on a different grid of the same physical space is
  resampled (nearest neighbour) onto the CT grid and noted (QC column `resampled`); one that does not
  overlap the CT is an error for that volume.
- A label map (TotalSegmentator `--ml` output: one file, voxel = class id) is turned into channel
  words with one table lookup per voxel.

Output `results/masks/shard-<k>.zarr`: array `<volume_id>` (z, y, x) uint32 on the CT's native grid,
chunked by 16 slices, attributes `spacing`, `origin`, `direction` (SimpleITK x, y, z order) and
`channels_available` (channels at least one input structure maps to; a backend without heart
chambers leaves those out); group attributes `channels`, `table_version`, `volume_ids`.
QC `results/qc/regions/shard-<k>.parquet`: one row per volume: `volume_id`, `stage`, `status`
(ok / error / skipped), `error`, `note`, `n_files`, `n_used`, `unknown`, `resampled`; and a picture per
sampled volume under `results/qc/regions/shard-<k>/` (axial and coronal slices, region overlays).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
import yaml
import zarr
from zarr.codecs import ZstdCodec

from pipeline.constants import CHANNELS, REGIONS
from pipeline.io import (
    Inflater,
    InputError,
    atomic_output,
    check_memory,
    image_array,
    parse_nifti_header,
    read_header_info,
    read_image,
    read_nifti_header,
    setup_logging,
    write_parquet,
)

MASK_SUFFIX = ".nii.gz"
MASK_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_VOCABULARY = "radgenome"
QC_COLUMNS = ("volume_id", "stage", "status", "error", "note", "n_files", "n_used", "unknown", "resampled")
Z_CHUNK = 16
DEFAULT_MEMORY_CAP_GB = 8.0


# ---- label table ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vocabulary:
    bits: dict[str, int]
    unused: dict[str, str]

    def classify(self, name: str) -> str:
        if name in self.bits:
            return "used"
        return "unused" if name in self.unused else "unknown"

    @property
    def names(self) -> list[str]:
        return sorted([*self.bits, *self.unused])


@dataclass(frozen=True)
class LabelTable:
    """Structure name -> channel bit word, per vocabulary; names left out on purpose, with reasons.

    `bits` / `unused` are the default (`radgenome`) vocabulary's.
    """

    version: int
    bits: dict[str, int]
    unused: dict[str, str]
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str) -> LabelTable:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        channels = tuple(raw["channels"])
        if channels != CHANNELS:
            raise ValueError(f"{path}: channels {channels} differ from pipeline.constants.CHANNELS")
        index = {c: i for i, c in enumerate(channels)}
        vocabularies: dict[str, Vocabulary] = {}
        for vname, section in raw["vocabularies"].items():
            bits: dict[str, int] = {}
            for name, chans in (section.get("structures") or {}).items():
                unknown = [c for c in chans if c not in index]
                if unknown or not chans:
                    raise ValueError(f"{path}: {vname} structure {name!r} maps to unknown channels {unknown}")
                bits[str(name)] = int(sum(1 << index[c] for c in set(chans)))
            unused = {str(k): str(v) for k, v in (section.get("unused") or {}).items()}
            both = set(bits) & set(unused)
            if both:
                raise ValueError(f"{path}: {vname} names both used and unused: {sorted(both)}")
            vocabularies[str(vname)] = Vocabulary(bits, unused)
        if DEFAULT_VOCABULARY not in vocabularies:
            raise ValueError(f"{path}: no {DEFAULT_VOCABULARY!r} vocabulary")
        default = vocabularies[DEFAULT_VOCABULARY]
        return cls(int(raw["version"]), default.bits, default.unused, vocabularies)

    def vocabulary(self, name: str = DEFAULT_VOCABULARY) -> Vocabulary:
        if name not in self.vocabularies:
            raise ValueError(f"label table has no vocabulary {name!r} (has {sorted(self.vocabularies)})")
        return self.vocabularies[name]

    def classify(self, name: str, vocabulary: str = DEFAULT_VOCABULARY) -> str:
        return self.vocabulary(vocabulary).classify(name)


def unpack_channel(labels: np.ndarray, channel: str) -> np.ndarray:
    """Boolean mask of one channel from the packed array."""
    return (labels >> np.uint32(CHANNELS.index(channel))) & np.uint32(1) == 1


def channel_names(word: int) -> list[str]:
    return [c for i, c in enumerate(CHANNELS) if word >> i & 1]


# ---- the CT grid ----------------------------------------------------------------------------------


@dataclass
class CtGrid:
    """The CT's geometry from its header only (no voxels read)."""

    size: tuple[int, int, int]  # x, y, z
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    nifti_key: bytes | None  # NIfTI geometry fields, to recognise masks written on the same grid

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.size[2], self.size[1], self.size[0]

    def geometry(self) -> dict[str, list[float]]:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    def matches(self, reader: sitk.ImageFileReader | sitk.Image) -> bool:
        return (
            tuple(reader.GetSize()) == self.size
            and np.allclose(reader.GetSpacing(), self.spacing, atol=1e-4)
            and np.allclose(reader.GetOrigin(), self.origin, atol=1e-3)
            and np.allclose(reader.GetDirection(), self.direction, atol=1e-4)
        )

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        return _bounds(self.size, self.origin, self.spacing, self.direction)


def _bounds(size, origin, spacing, direction) -> tuple[np.ndarray, np.ndarray]:
    """Physical bounding box (x, y, z mm) of the voxel extents of a grid."""
    d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing, float)
    corners = np.array(np.meshgrid(*[[-0.5, s - 0.5] for s in size])).T.reshape(-1, 3)
    pts = np.asarray(origin, float) + corners @ d.T
    return pts.min(0), pts.max(0)


def bytes_per_voxel(threads: int) -> float:
    """Peak bytes per CT voxel of merging one volume: labels + per-thread accumulators and buffers."""
    return 4 + 4 + max(1, threads) * (3 + 2)


def read_ct_grid(ct_path: Path, volume_id: str, memory_cap_bytes: int | None = None, threads: int = 1) -> CtGrid:
    reader = read_header_info(ct_path, volume_id)
    if reader.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {ct_path} is {reader.GetDimension()}D, expected a 3D CT")
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"volume {volume_id}: {ct_path} has {reader.GetNumberOfComponents()} components per "
                         "voxel, expected a scalar CT")
    check_memory(reader, ct_path, volume_id, memory_cap_bytes, bytes_per_voxel(threads))
    key = None
    if ct_path.name.endswith((".nii", ".nii.gz")):
        hdr = read_nifti_header(ct_path, volume_id)
        key = hdr.geometry_key if hdr is not None and len(hdr.dims) == 3 else None
    return CtGrid(tuple(int(s) for s in reader.GetSize()), tuple(reader.GetSpacing()), tuple(reader.GetOrigin()),
                  tuple(reader.GetDirection()), key)


def read_ct_header(ct_path: Path, volume_id: str) -> CtGrid:
    """The CT's geometry from its header (kept for callers of the old name)."""
    return read_ct_grid(Path(ct_path), volume_id)


# ---- reading one mask -----------------------------------------------------------------------------


N_BYTES = (len(CHANNELS) + 7) // 8  # bytes of the channel word in use


class _Workspace:
    """One thread's uint8 accumulator planes (one per byte of the channel word) and gzip inflater.

    Workspaces are pooled per grid shape and reused from volume to volume: a shard of same-size
    volumes allocates (and page-faults) them once. After a volume only the touched boxes are zeroed.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.planes = np.zeros((N_BYTES, *shape), np.uint8)
        self.inflater = Inflater()
        self.start()

    def start(self) -> None:
        self.touched = np.zeros(N_BYTES, bool)
        self.whole = False  # a label map OR-ed whole planes
        self.boxes: dict[int, list[int]] = {}  # channel bit -> [z0, z1, y0, y1, x0, x1]

    def grow(self, word: int, box: list[int]) -> None:
        _grow(self.boxes, word, box)

    def clear(self) -> None:
        if self.whole:
            self.planes.fill(0)
        else:
            for bit, (z0, z1, y0, y1, x0, x1) in self.boxes.items():
                self.planes[bit // 8, z0:z1, y0:y1, x0:x1] = 0
        self.start()


def _grow(boxes: dict[int, list[int]], word: int, box: list[int]) -> None:
    bit = 0
    while word >> bit:
        if word >> bit & 1:
            old = boxes.get(bit)
            boxes[bit] = list(box) if old is None else [min(old[0], box[0]), max(old[1], box[1]),
                                                         min(old[2], box[2]), max(old[3], box[3]),
                                                         min(old[4], box[4]), max(old[5], box[5])]
        bit += 1


_POOL: dict[tuple[int, int, int], list[_Workspace]] = {}
_POOL_LOCK = threading.Lock()


def _take_workspace(shape: tuple[int, int, int]) -> _Workspace:
    with _POOL_LOCK:
        for other in [s for s in _POOL if s != shape]:  # another grid size: free the old ones
            del _POOL[other]
        free = _POOL.setdefault(shape, [])
        if free:
            return free.pop()
    return _Workspace(shape)


def _give_back(shape: tuple[int, int, int], workspaces: Sequence[_Workspace]) -> None:
    with _POOL_LOCK:
        free = _POOL.setdefault(shape, [])
        for ws in workspaces:
            if len(free) < 8:
                free.append(ws)


class _Merger:
    """Reads structure files and ORs them into per-thread accumulators (see the module docstring)."""

    def __init__(self, volume_id: str, grid: CtGrid, memory_cap_bytes: int | None) -> None:
        self.volume_id = volume_id
        self.grid = grid
        self.memory_cap_bytes = memory_cap_bytes
        self._local = threading.local()
        self._all: list[_Workspace] = []
        self._lock = threading.Lock()
        self._labelmap = False

    def _acc(self) -> _Workspace:
        ws = getattr(self._local, "ws", None)
        if ws is None:
            ws = _take_workspace(self.grid.shape)
            self._local.ws = ws
            with self._lock:
                self._all.append(ws)
        return ws

    def release(self) -> None:
        """Zero the touched parts of the workspaces and return them to the pool.

        `labels` ORs the other workspaces' planes into the first one's, so every workspace is
        cleared over the union of all boxes.
        """
        union: dict[int, list[int]] = {}
        whole = any(ws.whole for ws in self._all)
        for ws in self._all:
            for bit, box in ws.boxes.items():
                _grow(union, 1 << bit, box)
        for ws in self._all:
            ws.boxes, ws.whole = union, whole
            ws.clear()
        _give_back(self.grid.shape, self._all)
        self._all = []

    # -- one file --
    def add_file(self, path: Path, word: int) -> bool:
        """Merge one binary mask; returns True when it had to be resampled onto the CT grid."""
        flat, resampled = self._mask_voxels(path)
        self._or_into(self._validated(flat, path), word, path)
        return resampled

    def _mask_voxels(self, path: Path) -> tuple[np.ndarray, bool]:
        """Voxels of a mask on the CT grid, flat in (z, y, x) order, and whether it was resampled."""
        vid, grid = self.volume_id, self.grid
        hdr = None
        if grid.nifti_key is not None and path.name.endswith(MASK_SUFFIXES):
            data = _read_bytes(path, vid)
            if path.name.endswith(".gz"):
                import zlib

                try:
                    head = zlib.decompressobj(31).decompress(data[:8192], 352)
                except zlib.error as exc:
                    raise InputError(f"volume {vid}: {path} is not a readable gzip file ({exc})") from None
            else:
                head = data[:352]
            hdr = parse_nifti_header(head)
            if (hdr is not None and hdr.dtype is not None and not hdr.scaled and hdr.dims == grid.size
                    and hdr.geometry_key == grid.nifti_key):
                if path.name.endswith(".gz"):
                    raw = self._acc().inflater.inflate(data, hdr.nbytes, path, vid)
                else:
                    if len(data) < hdr.nbytes:
                        raise InputError(f"volume {vid}: {path} is truncated ({len(data)} of {hdr.nbytes} bytes)")
                    raw = np.frombuffer(data, np.uint8, hdr.nbytes)
                return raw[hdr.vox_offset : hdr.nbytes].view(hdr.dtype), False
        return self._mask_voxels_itk(path)

    def _mask_voxels_itk(self, path: Path) -> tuple[np.ndarray, bool]:
        vid, grid = self.volume_id, self.grid
        reader = read_header_info(path, vid)
        if reader.GetDimension() != 3:
            raise InputError(f"volume {vid}: mask {path} is {reader.GetDimension()}D, expected 3D")
        check_memory(reader, path, vid, self.memory_cap_bytes, 8.0)
        same = grid.matches(reader)
        if not same:
            lo_m, hi_m = _bounds(reader.GetSize(), reader.GetOrigin(), reader.GetSpacing(), reader.GetDirection())
            lo_c, hi_c = grid.bounds()
            if np.any(hi_m <= lo_c) or np.any(hi_c <= lo_m):
                raise InputError(f"volume {vid}: mask {path} does not overlap the CT in physical space "
                                 f"(mask spans {np.round(lo_m, 1).tolist()}..{np.round(hi_m, 1).tolist()} mm, "
                                 f"CT {np.round(lo_c, 1).tolist()}..{np.round(hi_c, 1).tolist()} mm)")
        image = read_image(path, vid)
        if not same:
            arr = image_array(image, path, vid)  # values checked on the mask's own grid first
            self._validated(arr.reshape(-1), path)
            image = sitk.Resample(image, list(grid.size), sitk.Transform(), sitk.sitkNearestNeighbor,
                                  grid.origin, grid.spacing, grid.direction, 0, image.GetPixelID())
        return image_array(image, path, vid).reshape(-1), not same

    def _validated(self, flat: np.ndarray, path: Path) -> np.ndarray:
        """0/1 uint8 voxels of a binary mask; anything else is an InputError naming volume and file."""
        if flat.dtype == np.uint8:
            return flat
        if flat.dtype.kind == "f":
            if not np.isfinite(flat).all():
                raise InputError(f"volume {self.volume_id}: mask {path} contains NaN or inf voxels")
            bad = (flat != 0) & (flat != 1)
            if bad.any():
                raise InputError(f"volume {self.volume_id}: mask {path} has values other than 0 and 1 "
                                 f"(e.g. {float(flat[bad][0])}): expected a binary mask")
            return (flat != 0).view(np.uint8)
        lo, hi = flat.min(), flat.max()
        if lo < 0 or hi > 1:
            raise InputError(f"volume {self.volume_id}: mask {path} has values other than 0 and 1 "
                             f"(range {lo}..{hi}): expected a binary mask")
        return flat.astype(np.uint8)

    def _or_into(self, flat: np.ndarray, word: int, path: Path | None = None) -> None:
        nz, ny, nx = self.grid.shape
        per_slice = flat.reshape(nz, ny * nx).max(axis=1)  # one pass: validation and z-range
        top = int(per_slice.max())
        if top == 0:
            return
        if top > 1:
            raise InputError(f"volume {self.volume_id}: mask {path or '(unnamed)'} has values other than 0 and 1 "
                             f"(found {top}): expected a binary mask")
        zs = np.flatnonzero(per_slice)
        z0, z1 = int(zs[0]), int(zs[-1]) + 1
        slab = flat[z0 * ny * nx : z1 * ny * nx].reshape(z1 - z0, ny, nx)
        footprint = slab.max(axis=0) if z1 - z0 > 1 else slab[0]  # (y, x), element-wise over slices
        ys = np.flatnonzero(footprint.max(axis=1))
        xs = np.flatnonzero(footprint.max(axis=0))
        y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        box = slab[:, y0:y1, x0:x1]
        ws = self._acc()
        ws.grow(word, [z0, z1, y0, y1, x0, x1])
        for k in range(N_BYTES):
            byte = (word >> (8 * k)) & 0xFF
            if byte:
                target = ws.planes[k, z0:z1, y0:y1, x0:x1]
                np.bitwise_or(target, box if byte == 1 else box * np.uint8(byte), out=target)
                ws.touched[k] = True

    # -- a label map --
    def add_labelmap(self, path: Path, lut: np.ndarray) -> tuple[bool, list[int]]:
        """Merge a label map through `lut` (class id -> channel word); returns (resampled, unknown ids)."""
        self._labelmap = True
        flat, resampled = self._mask_voxels(path)
        if flat.dtype.kind == "f":
            if not np.isfinite(flat).all() or (flat != np.round(flat)).any():
                raise InputError(f"volume {self.volume_id}: label map {path} has non-integer values")
            flat = flat.astype(np.int64)
        if flat.size and (flat.min() < 0):
            raise InputError(f"volume {self.volume_id}: label map {path} has negative labels")
        top = int(flat.max()) if flat.size else 0
        present = np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1))
        unknown = [int(i) for i in present if i != 0 and (i >= lut.size or lut[i] == 0)]
        table = np.zeros(max(top + 1, lut.size), np.uint32)
        table[: lut.size] = lut
        words = table[flat].reshape(self.grid.shape)
        ws = self._acc()
        ws.whole = True
        for k in range(N_BYTES):
            byte_plane = ((words >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.uint8)
            if byte_plane.any():
                np.bitwise_or(ws.planes[k], byte_plane, out=ws.planes[k])
                ws.touched[k] = True
        return resampled, unknown

    def labels(self, out: np.ndarray | None = None) -> np.ndarray:
        """The packed (z, y, x) uint32 array (into `out` when given): the byte planes interleaved."""
        shape = self.grid.shape
        if out is None or out.shape != shape or out.dtype != np.uint32:
            out = np.empty(shape, np.uint32)
        as_bytes = out.view(np.uint8).reshape(*shape, 4)
        little = np.little_endian
        for k in range(4):
            column = as_bytes[..., k if little else 3 - k]
            planes = [ws.planes[k] for ws in self._all if k < N_BYTES and ws.touched[k]]
            if not planes:
                column[...] = 0
                continue
            merged = planes[0]
            for p in planes[1:]:
                np.bitwise_or(merged, p, out=merged)
            column[...] = merged
        return out

    def boxes(self) -> dict[str, list[int]] | None:
        """Bounding box of each non-empty channel (z0, z1, y0, y1, x0, x1), when every input was a mask."""
        if self._labelmap:
            return None
        merged: dict[int, list[int]] = {}
        for ws in self._all:
            for bit, box in ws.boxes.items():
                _grow(merged, 1 << bit, box)
        return {CHANNELS[bit]: box for bit, box in sorted(merged.items())}


def _read_bytes(path: Path, volume_id: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"volume {volume_id}: file not found: {path}") from None
    except OSError as exc:
        raise InputError(f"volume {volume_id}: cannot read {path}: {exc}") from None


# ---- one volume -----------------------------------------------------------------------------------


@dataclass
class VolumeMasks:
    labels: np.ndarray
    grid: CtGrid
    unknown: list[str] = field(default_factory=list)
    resampled: list[str] = field(default_factory=list)
    n_files: int = 0
    n_used: int = 0
    available: int = 0  # channel bits that at least one input structure maps to
    boxes: dict[str, list[int]] | None = None  # non-empty channel -> [z0, z1, y0, y1, x0, x1]

    @property
    def reference(self) -> CtGrid:
        return self.grid


def structure_files(mask_dir: Path, volume_id: str) -> list[Path]:
    if not mask_dir.is_dir():
        raise InputError(f"volume {volume_id}: mask folder not found: {mask_dir}")
    files = sorted(p for p in mask_dir.iterdir() if p.name.endswith(MASK_SUFFIXES) and not p.name.startswith("."))
    if not files:
        raise InputError(f"volume {volume_id}: no {MASK_SUFFIX} masks in {mask_dir}")
    return files


def structure_name(path: Path) -> str:
    for suffix in MASK_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def merge_volume(
    volume_id: str,
    ct_path: Path,
    mask_dir: Path,
    table: LabelTable,
    threads: int = 1,
    vocabulary: str = DEFAULT_VOCABULARY,
    memory_cap_bytes: int | None = int(DEFAULT_MEMORY_CAP_GB * 2**30),
    out: np.ndarray | None = None,
) -> VolumeMasks:
    """Read every structure file of one volume once and OR its channel word into the packed array.

    `out`: a (z, y, x) uint32 array to write the result into (reused across volumes by `run_shard`).
    """
    ct_path, mask_dir = Path(ct_path), Path(mask_dir)
    grid = read_ct_grid(ct_path, volume_id, memory_cap_bytes, threads)
    files = structure_files(mask_dir, volume_id)
    vocab = table.vocabulary(vocabulary)
    unknown: list[str] = []
    used: list[tuple[Path, int]] = []
    for path in files:
        name = structure_name(path)
        kind = vocab.classify(name)
        if kind == "unknown":
            unknown.append(name)
        elif kind == "used":
            used.append((path, vocab.bits[name]))
    available = 0
    for _, word in used:
        available |= word
    merger = _Merger(volume_id, grid, memory_cap_bytes)
    resampled: list[str] = []
    try:
        if threads <= 1 or len(used) <= 1:
            for path, word in used:
                if merger.add_file(path, word):
                    resampled.append(path.name)
        else:
            with ThreadPoolExecutor(max_workers=threads) as pool:
                for (path, _), moved in zip(used, pool.map(lambda item: merger.add_file(*item), used)):
                    if moved:
                        resampled.append(path.name)
        labels = merger.labels(out)
        boxes = merger.boxes()
    finally:
        merger.release()
    return VolumeMasks(labels, grid, unknown, resampled, len(files), len(used), available, boxes)


def read_label_names(path: Path | str) -> dict[int, str]:
    """`id<TAB>name` lines (comments with #) -> {id: name}; e.g. TotalSegmentator's class map."""
    names: dict[int, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, name = line.split("\t")[:2]
        names[int(key)] = name.strip()
    return names


def merge_labelmap(
    volume_id: str,
    ct_path: Path,
    labelmap: Path,
    label_names: dict[int, str],
    table: LabelTable,
    vocabulary: str = "totalsegmentator",
    memory_cap_bytes: int | None = int(DEFAULT_MEMORY_CAP_GB * 2**30),
) -> VolumeMasks:
    """A multi-class label map (class id per voxel, names from `label_names`) -> packed channels."""
    ct_path, labelmap = Path(ct_path), Path(labelmap)
    grid = read_ct_grid(ct_path, volume_id, memory_cap_bytes, 1)
    vocab = table.vocabulary(vocabulary)
    top = max(label_names, default=0)
    lut = np.zeros(top + 1, np.uint32)
    unknown_names: list[str] = []
    n_used = 0
    for idx, name in label_names.items():
        kind = vocab.classify(name)
        if kind == "used":
            lut[idx] = vocab.bits[name]
            n_used += 1
        elif kind == "unknown":
            unknown_names.append(name)
    merger = _Merger(volume_id, grid, memory_cap_bytes)
    try:
        moved, unknown_ids = merger.add_labelmap(labelmap, lut)
        labels = merger.labels()
    finally:
        merger.release()
    unknown_names += [f"label {i}" for i in unknown_ids if i not in label_names]
    available = int(np.bitwise_or.reduce(lut)) if lut.size else 0
    return VolumeMasks(labels, grid, sorted(set(unknown_names)), [labelmap.name] if moved else [],
                       1, n_used, available)


# ---- QC picture -----------------------------------------------------------------------------------

REGION_COLOURS = {"lung": "#4c9be8", "airways": "#39d0d8", "mediastinum": "#f2c94c", "heart": "#eb5757",
                  "osseous": "#f2f2f2", "abdomen": "#6fcf97"}
LESION_COLOURS = {"nodule": "#ff00ff", "cyst": "#ff9f1a", "effusion": "#9b51e0"}


def qc_picture(ct_path: Path, labels: np.ndarray, grid: CtGrid, volume_id: str, out_png: Path) -> None:
    """Three axial and two coronal CT slices with the region (filled) and lesion (outlined) overlays."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    ct = image_array(read_image(ct_path, volume_id), ct_path, volume_id, np.float32)
    nz, ny, nx = labels.shape
    region_bits = [CHANNELS.index(r) for r in REGIONS]
    lung = unpack_channel(labels, "lung")
    zs = np.flatnonzero(lung.any(axis=(1, 2)))
    z_pick = (np.linspace(zs[0], zs[-1], 5)[1:4] if zs.size else np.linspace(0, nz - 1, 5)[1:4]).round().astype(int)
    ys = np.flatnonzero((labels != 0).any(axis=(0, 2)))
    y_pick = (np.linspace(ys[0], ys[-1], 4)[1:3] if ys.size else [ny // 3, 2 * ny // 3])
    views = [("axial", int(z)) for z in z_pick] + [("coronal", int(round(y))) for y in y_pick]
    sx, sy, sz = grid.spacing[:3]
    fig, axes = plt.subplots(1, len(views), figsize=(3.2 * len(views), 3.6), dpi=90)
    cmap = ListedColormap([REGION_COLOURS[r] for r in REGIONS])
    for ax, (kind, i) in zip(axes, views):
        if kind == "axial":
            img, lab, aspect = ct[i], labels[i], sy / sx
        else:
            img, lab, aspect = ct[::-1, i, :], labels[::-1, i, :], sz / sx
        ax.imshow(np.clip(img, -1000, 600), cmap="gray", vmin=-1000, vmax=600, aspect=aspect, interpolation="nearest")
        region = np.full(lab.shape, -1.0)
        for k, bit in enumerate(region_bits):  # later regions drawn over earlier ones
            region[(lab >> np.uint32(bit)) & np.uint32(1) == 1] = k
        ax.imshow(np.ma.masked_less(region, 0), cmap=cmap, vmin=0, vmax=len(REGIONS) - 1, alpha=0.35,
                  aspect=aspect, interpolation="nearest")
        for lesion, colour in LESION_COLOURS.items():
            m = ((lab >> np.uint32(CHANNELS.index(lesion))) & np.uint32(1)).astype(float)
            if m.any():
                ax.contour(m, levels=[0.5], colors=[colour], linewidths=1.0)
        ax.set_title(f"{kind} {'z' if kind == 'axial' else 'y'}={i}", fontsize=8)
        ax.axis("off")
    handles = [Patch(color=REGION_COLOURS[r], label=r) for r in REGIONS]
    handles += [Patch(edgecolor=c, facecolor="none", label=lesion) for lesion, c in LESION_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    fig.suptitle(f"{volume_id}: regions (filled) and lesions (outlined)", fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def sample_for_pictures(volume_ids: Sequence[str], n: int) -> list[str]:
    """`n` volumes spread evenly over the shard (first, last, in between), deterministic."""
    if n <= 0 or not volume_ids:
        return []
    idx = np.unique(np.linspace(0, len(volume_ids) - 1, min(n, len(volume_ids))).round().astype(int))
    return [volume_ids[i] for i in idx]


# ---- a shard --------------------------------------------------------------------------------------


def _qc_row(volume_id: str, status: str, error: str = "", **extra: object) -> dict[str, object]:
    row: dict[str, object] = {"volume_id": volume_id, "stage": "regions", "status": status, "error": error,
                              "note": "", "n_files": 0, "n_used": 0, "unknown": [], "resampled": []}
    row.update(extra)
    return row


def _segment_rows(manifest: pd.DataFrame, segment: pd.DataFrame | None, shard: int) -> list[dict[str, object]]:
    """Per volume: CT path and where its masks are (the segment table, or the manifest's mask_dir)."""
    from pipeline.cohort import validate_volume_id

    rows = manifest[manifest["shard"] == shard]
    seg = segment.set_index("volume_id") if segment is not None and len(segment) else None
    out = []
    for row in rows.itertuples(index=False):
        item = {"volume_id": row.volume_id, "ct_path": row.ct_path, "mask_path": getattr(row, "mask_dir", ""),
                "mask_format": "folder", "vocabulary": DEFAULT_VOCABULARY, "label_names": "",
                "status": "ok", "error": ""}
        if seg is not None and row.volume_id in seg.index:
            s = seg.loc[row.volume_id]
            for key in ("mask_path", "mask_format", "vocabulary", "label_names", "status", "error"):
                if key in s.index and isinstance(s[key], str) and (s[key] or key in ("error", "label_names")):
                    item[key] = s[key]
            if "mask_path" not in s.index and "mask_dir" in s.index:
                item["mask_path"] = s["mask_dir"]
        try:
            validate_volume_id(row.volume_id, "manifest")
        except InputError as exc:
            item["status"], item["error"] = "invalid", str(exc)
        out.append(item)
    return out


def process_volume(item: dict[str, object], table: LabelTable, threads: int,
                   memory_cap_bytes: int | None, out: np.ndarray | None = None) -> VolumeMasks:
    vid, ct_path = str(item["volume_id"]), Path(str(item["ct_path"]))
    if item["mask_format"] == "labelmap":
        return merge_labelmap(vid, ct_path, Path(str(item["mask_path"])),
                              {int(k): v for k, v in json.loads(str(item["label_names"])).items()},
                              table, str(item["vocabulary"]), memory_cap_bytes)
    return merge_volume(vid, ct_path, Path(str(item["mask_path"])), table, threads, str(item["vocabulary"]),
                        memory_cap_bytes, out)


def run_shard(
    manifest: pd.DataFrame,
    shard: int,
    table: LabelTable,
    out_zarr: Path,
    out_qc: Path,
    on_error: str = "fail",
    threads: int = 1,
    segment: pd.DataFrame | None = None,
    pictures: Path | None = None,
    n_pictures: int = 1,
    memory_cap_gb: float = DEFAULT_MEMORY_CAP_GB,
) -> pd.DataFrame:
    log = setup_logging()
    items = _segment_rows(manifest, segment, shard)
    cap = int(memory_cap_gb * 2**30) if memory_cap_gb else None
    qc: list[dict[str, object]] = []
    picture_ids = set(sample_for_pictures([str(i["volume_id"]) for i in items if i["status"] == "ok"], n_pictures))
    with atomic_output(out_zarr) as tmp_zarr, _picture_dir(pictures) as tmp_pics:
        group = zarr.open_group(str(tmp_zarr), mode="w", zarr_format=3)
        done: list[str] = []
        out_buffer: np.ndarray | None = None
        for i, item in enumerate(items, 1):
            vid = str(item["volume_id"])
            if item["status"] == "invalid":
                if on_error != "skip":
                    raise InputError(str(item["error"]))
                log.error("%s (skipped)", item["error"])
                qc.append(_qc_row(vid, "error", str(item["error"])))
                continue
            if item["status"] != "ok":  # failed in the segment stage (on_error: skip): recorded there
                log.error("volume %s skipped: %s", vid, item["error"])
                qc.append(_qc_row(vid, "skipped", f"segment: {item['error']}"))
                continue
            t0 = time.perf_counter()
            try:
                vm = process_volume(item, table, threads, cap, out_buffer)
                out_buffer = vm.labels  # reused for the next volume of the same size
                write_volume(group, vid, vm, tmp_zarr)
                if tmp_pics is not None and vid in picture_ids:
                    qc_picture(Path(str(item["ct_path"])), vm.labels, vm.grid, vid, tmp_pics / f"{vid}.png")
            except InputError as exc:
                if on_error != "skip":
                    raise
                log.error("%s (skipped)", exc)
                qc.append(_qc_row(vid, "error", str(exc)))
                continue
            done.append(vid)
            if vm.unknown:
                log.warning("volume %s: %d names not in the label table (%s vocabulary): %s", vid,
                            len(vm.unknown), item["vocabulary"], vm.unknown)
            note = "resampled to the CT grid: " + ", ".join(vm.resampled) if vm.resampled else ""
            qc.append(_qc_row(vid, "ok", note=note, n_files=vm.n_files, n_used=vm.n_used, unknown=vm.unknown,
                              resampled=vm.resampled))
            log.info("[%d/%d] %s: %d structure files (%d used) merged in %.2f s", i, len(items), vid,
                     vm.n_files, vm.n_used, time.perf_counter() - t0)
        group.attrs.update({"channels": list(CHANNELS), "table_version": table.version,
                            "volume_ids": done, "complete": True})
    qc_df = pd.DataFrame(qc, columns=list(QC_COLUMNS))
    write_parquet(qc_df, out_qc)
    return qc_df


class _picture_dir:
    """Context manager: a temporary folder renamed to `path` on success (None: no pictures)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._cm = atomic_output(path) if path is not None else None

    def __enter__(self) -> Path | None:
        if self._cm is None:
            return None
        tmp = self._cm.__enter__()
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp

    def __exit__(self, *exc: object) -> bool | None:
        return self._cm.__exit__(*exc) if self._cm is not None else None


def write_volume(group: zarr.Group, volume_id: str, vm: VolumeMasks, root: Path | None = None) -> None:
    """One volume's packed array (z-chunks of Z_CHUNK slices, zstd level 1) and its attributes.

    With `root` (the group's folder on local disk) the chunks are compressed on two threads and
    written as files in zarr v3's default layout (`<volume>/c/<k>/0/0`; all-zero chunks left out,
    as zarr does): the same bytes zarr writes, without its per-chunk copies.
    """
    labels = vm.labels
    chunks = (min(Z_CHUNK, max(1, labels.shape[0])), *labels.shape[1:])
    arr = group.create_array(volume_id, shape=labels.shape, dtype=np.uint32, chunks=chunks,
                             compressors=ZstdCodec(level=1), fill_value=0)
    if root is None or not _write_chunks(arr, labels, root / volume_id, chunks):
        arr[...] = labels
    arr.attrs.update({"spacing": list(vm.grid.spacing), "origin": list(vm.grid.origin),
                      "direction": list(vm.grid.direction), "channels_available": channel_names(vm.available)})
    if vm.boxes is not None:
        arr.attrs["channel_boxes"] = vm.boxes


def _write_chunks(arr: zarr.Array, labels: np.ndarray, folder: Path, chunks: tuple[int, ...]) -> bool:
    """Write the chunk files directly; False (nothing written) when the array is not the expected kind."""
    from numcodecs import Zstd

    meta = arr.metadata
    encoding = getattr(meta, "chunk_key_encoding", None)
    compressors = arr.compressors
    if (getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/"
            or len(compressors) != 1 or not isinstance(compressors[0], ZstdCodec) or compressors[0].checksum
            or not (folder / "zarr.json").is_file() or labels.shape[1:] != tuple(chunks[1:])):
        return False
    codec = Zstd(level=compressors[0].level)
    depth = chunks[0]

    def one(k: int) -> None:
        part = labels[k * depth : (k + 1) * depth]
        if not part.any():
            return
        if part.shape[0] < depth:  # edge chunk: stored at full chunk size, padded with the fill value
            full = np.zeros(chunks, np.uint32)
            full[: part.shape[0]] = part
            part = full
        target = folder / "c" / str(k) / "0"
        target.mkdir(parents=True, exist_ok=True)
        (target / "0").write_bytes(codec.encode(np.ascontiguousarray(part, dtype="<u4")))

    n = -(-labels.shape[0] // depth)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one, range(n)))
    return True


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--manifest", type=Path, required=True)
    ap.add_argument("--shard", type=int, required=True)
    ap.add_argument("--table", type=Path, required=True)
    ap.add_argument("--segment", type=Path, help="the segment stage's table for this shard (mask locations)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--qc", type=Path, required=True)
    ap.add_argument("--pictures", type=Path, help="folder for the QC pictures of the sampled volumes")
    ap.add_argument("--n-pictures", type=int, default=1, help="volumes per shard to draw")
    ap.add_argument("--memory-cap-gb", type=float, default=DEFAULT_MEMORY_CAP_GB)
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    manifest = pd.read_parquet(args.manifest)
    segment = pd.read_parquet(args.segment) if args.segment else None
    qc = run_shard(manifest, args.shard, LabelTable.load(args.table), args.out, args.qc, args.on_error,
                   args.threads, segment, args.pictures, args.n_pictures, args.memory_cap_gb)
    print(json.dumps(qc["status"].value_counts().to_dict()))


if __name__ == "__main__":
    main()
