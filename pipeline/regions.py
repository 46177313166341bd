"""Regions stage: per-structure masks -> one bit-packed uint32 channel array per volume.

Channels (`pipeline.constants.CHANNELS`, bit i = channel i): the 6 regions, the 3 lesions and the 12
attribute structures. The label table `config/regions.yaml` gives each structure name of a vocabulary
(`radgenome` = SAT terms, `totalsegmentator`) its channel bit word.

How a volume is merged
- Each structure file is read exactly once; names the table marks `unused` are not opened at all,
  names it does not know are reported (QC column `unknown`), never silently dropped.
- Files with the same bytes (apart from the gzip time stamp) hold the same voxels: each such group
  (e.g. all the empty masks of a volume) is decoded once, with the union of its channel words.
- Masks on the CT's own grid (NIfTI header geometry identical to the CT's) take the fast path. A
  uint8 .nii.gz is inflated by the sparse inflater (`pipeline.io.SparseInflater`, C source
  pipeline/_sparse_gunzip.c) into a reused all-zero per-thread buffer: it writes only the non-zero
  bytes (a mask's zero runs, most of its 12 MB at RadGenome size, are skipped, CRC still checked)
  and returns the OR of the voxel values (0/1 check) and the bounding box, so the mask is never
  read again to check it or find it. Other dtypes (or without the C extension) are inflated by
  libdeflate and one pass over the voxels does the check and finds the slices, and their slab the
  (y, x) footprint. Then only the mask's rows are OR-ed into uint8 accumulator planes, one per byte
  of the channel word (a lookup of the word's bytes, not a loop over labels or channels per voxel),
  each under its own lock.
  Threads decode different files at once (the decoder and numpy release the GIL). The planes are
  interleaved into the uint32 array in blocks of Z_CHUNK slices on the job's threads; in a shard
  job each block is zstd-compressed as its zarr chunk, and the attributes stage's channels
  counted, while it is in cache.
- Any other mask goes through SimpleITK: a mask on a different grid of the same physical space is
  resampled (nearest neighbour) onto the CT grid and noted (QC column `resampled`); one that does not
  overlap the CT is an error for that volume.
- A label map (TotalSegmentator `--ml` output: one file, voxel = class id) is turned into channel
  words with one table lookup per voxel.

Orientation: masks are merged on the CT's own grid, then the packed array is brought to the canonical
orientation (`pipeline.orientation`: LPS, ITK's identity direction; an exact transpose / flip, once per
volume; a CT already in LPS is left as it is). The features stage turns the CT the same way.

Output `results/masks/shard-<k>.zarr`: array `<volume_id>` (z, y, x) uint32 on the CT's grid in the
canonical orientation, chunked by 16 slices (zstd level ZSTD_LEVEL), attributes `spacing`, `origin`,
`direction` (of that grid, SimpleITK x, y, z order), `channels_available` (channels at least one input structure maps to; a
backend without heart chambers leaves those out) and, for masks, `channel_boxes` (each non-empty
channel's [z0, z1, y0, y1, x0, x1]) and `channel_voxels` (voxel count of each MEASURED channel);
group attributes `channels`, `table_version`, `orientation` ("LPS"), `decoder` (the mask decoder used:
`sparse+libdeflate`, `sparse+zlib`, `libdeflate` or `zlib`; config `regions.decoder`), `volume_ids`, `complete`.
QC `results/qc/regions/shard-<k>.parquet`: one row per volume: `volume_id`, `stage`, `status`
(ok / error / skipped), `error`, `note`, `n_files`, `n_used`, `unknown`, `resampled`, `decoder`; and a picture per
sampled volume under `results/qc/regions/shard-<k>/` (axial and coronal slices, region overlays).
"""

from __future__ import annotations

import argparse
import json
import os
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

from pipeline.constants import ATTRIBUTE_STRUCTURES, CHANNELS, LESIONS, REGIONS
from pipeline.io import (
    DECODERS,
    LIBDEFLATE_PROBLEM,
    Inflater,
    InputError,
    MaskExtent,
    SparseInflater,
    atomic_output,
    check_memory,
    image_array,
    parse_nifti_header,
    read_header_info,
    read_image,
    read_nifti_header,
    set_decoder,
    setup_logging,
    write_parquet,
)
from pipeline.label_colours import LESION_COLOURS, REGION_COLOURS  # QC overlays: the export's colours
from pipeline.orientation import CANONICAL, Reorientation, reorientation

MASK_SUFFIX = ".nii.gz"
MASK_SUFFIXES = (".nii.gz", ".nii")
DEFAULT_VOCABULARY = "radgenome"
QC_COLUMNS = ("volume_id", "stage", "status", "error", "note", "n_files", "n_used", "unknown", "resampled", "decoder")
Z_CHUNK = 16
# zstd's fast level -1: on these arrays (long runs of a few words) ~25% less compression time than
# level 1 for ~7% larger chunks (0.34 vs 0.32 MB for a RadGenome-size volume); the same values read back
ZSTD_LEVEL = -1
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
# channels whose voxels the regions stage counts (array attribute `channel_voxels`): the attributes
# stage's organ volumes and lesion checks, counted here in the uint8 byte planes while they are
# interleaved (a quarter of the bytes of the packed words, on the job's threads)
MEASURED: tuple[str, ...] = (*ATTRIBUTE_STRUCTURES, *LESIONS)
_PREREAD_MAX = 256 << 20  # compressed bytes per volume read up front to find identical files


class _Workspace:
    """A gzip inflater (one per thread) and, for the workspace that accumulates a volume, its uint8
    planes (one per byte of the channel word; allocated on first use).

    Workspaces are pooled per grid shape and reused from volume to volume: a shard of same-size
    volumes allocates (and page-faults) them once. After a volume only the touched rows are zeroed.
    """

    def __init__(self, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self._planes: np.ndarray | None = None
        self.inflater = Inflater()
        self.sparse = SparseInflater()
        self.start()

    @property
    def planes(self) -> np.ndarray:
        if self._planes is None:
            self._planes = np.zeros((N_BYTES, *self.shape), np.uint8)
        return self._planes

    def start(self) -> None:
        self.touched = np.zeros(N_BYTES, bool)
        self.whole = False  # a label map OR-ed whole planes
        self.boxes: dict[int, list[int]] = {}  # channel bit -> [z0, z1, y0, y1, x0, x1]

    def grow(self, word: int, box: list[int]) -> None:
        _grow(self.boxes, word, box)

    def clear(self) -> None:
        if self._planes is not None:
            if self.whole:
                self._planes.fill(0)
            else:  # whole rows (contiguous) of each plane's union box
                per_plane: dict[int, list[int]] = {}
                for bit, box in self.boxes.items():
                    _grow(per_plane, 1 << (bit // 8), box)
                for k, (z0, z1, y0, y1, _, _) in per_plane.items():
                    self._planes[k, z0:z1, y0:y1] = 0
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


def _take_workspace(shape: tuple[int, int, int], planes: bool = False) -> _Workspace:
    """A pooled workspace for this grid shape (with `planes`: preferably one whose planes exist)."""
    with _POOL_LOCK:
        for other in [s for s in _POOL if s != shape]:  # another grid size: free the old ones
            del _POOL[other]
        free = _POOL.setdefault(shape, [])
        if free:
            have = [i for i, ws in enumerate(free) if ws._planes is not None] if planes else []
            return free.pop(have[-1] if have else -1)
    return _Workspace(shape)


_EXECUTORS: dict[int, ThreadPoolExecutor] = {}  # worker count -> the process-wide pool


def _executor(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of `threads` worker threads, kept from volume to volume (threads start once)."""
    with _POOL_LOCK:
        pool = _EXECUTORS.get(threads)
        if pool is None:
            for other in list(_EXECUTORS):  # a job uses one thread count: drop the others
                _EXECUTORS.pop(other).shutdown(wait=False)
            pool = _EXECUTORS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="regions")
        return pool


def _give_back(shape: tuple[int, int, int], workspaces: Sequence[_Workspace]) -> None:
    with _POOL_LOCK:
        free = _POOL.setdefault(shape, [])
        for ws in workspaces:
            if len(free) < 8:
                free.append(ws)


class _Merger:
    """Reads structure files and ORs them into one set of accumulator planes (see the module docstring).

    Threads decode files into their own inflater buffers at once; the OR into a plane is done under
    that plane's lock (short next to decoding), so there is one accumulator to interleave and clear.
    """

    def __init__(self, volume_id: str, grid: CtGrid, memory_cap_bytes: int | None) -> None:
        self.volume_id = volume_id
        self.grid = grid
        self.memory_cap_bytes = memory_cap_bytes
        self._local = threading.local()
        self._main = _take_workspace(grid.shape, planes=True)  # the accumulator (and one thread's inflater)
        self._main.planes  # noqa: B018 - allocated here, before threads share it
        self._main_taken = False
        self._all: list[_Workspace] = [self._main]
        self._lock = threading.Lock()
        self._plane_locks = [threading.Lock() for _ in range(N_BYTES)]
        self._labelmap = False
        self.encoded: dict[int, bytes] | None = None
        self.voxels: dict[str, int] | None = None

    def _acc(self) -> _Workspace:
        """This thread's workspace (for its inflater)."""
        ws = getattr(self._local, "ws", None)
        if ws is None:
            with self._lock:
                if not self._main_taken:
                    self._main_taken, ws = True, self._main
            if ws is None:
                ws = _take_workspace(self.grid.shape)
                with self._lock:
                    self._all.append(ws)
            self._local.ws = ws
        return ws

    def release(self) -> None:
        """Zero the touched rows of the accumulator and return the workspaces to the pool."""
        for ws in self._all:
            ws.clear()
        _give_back(self.grid.shape, self._all)
        self._all = []

    # -- one file --
    def add_file(self, path: Path, word: int, data: bytes | None = None) -> bool:
        """Merge one binary mask (`data`: its bytes, when already read); True when it had to be
        resampled onto the CT grid."""
        flat, resampled, extent = self._mask_voxels(path, data)
        self._or_into(self._validated(flat, path), word, path, extent)
        return resampled

    def _mask_voxels(self, path: Path, data: bytes | None = None) -> tuple[np.ndarray, bool, MaskExtent | None]:
        """Voxels of a mask on the CT grid, flat in (z, y, x) order, whether it was resampled, and
        its extent when the sparse inflater read it (a uint8 .nii.gz on the CT grid)."""
        vid, grid = self.volume_id, self.grid
        hdr = None
        name = path.name
        if grid.nifti_key is not None and name.endswith(MASK_SUFFIXES):
            if data is None:
                data = _read_bytes(path, vid)
            gz = name.endswith(".gz")
            if gz:
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
                if gz and hdr.dtype == np.uint8 and SparseInflater.available():  # dims == grid: nbytes fits
                    raw, extent = self._acc().sparse.inflate(data, hdr.nbytes, hdr.vox_offset, grid.shape, path, vid)
                    return raw[hdr.vox_offset : hdr.nbytes], False, extent
                if gz:
                    raw = self._acc().inflater.inflate(data, hdr.nbytes, path, vid)
                else:
                    if len(data) < hdr.nbytes:
                        raise InputError(f"volume {vid}: {path} is truncated ({len(data)} of {hdr.nbytes} bytes)")
                    raw = np.frombuffer(data, np.uint8, hdr.nbytes)
                return raw[hdr.vox_offset : hdr.nbytes].view(hdr.dtype), False, None
        return (*self._mask_voxels_itk(path), None)

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

    def _or_into(self, flat: np.ndarray, word: int, path: Path | None = None, extent: MaskExtent | None = None) -> bool:
        """OR a 0/1 mask into the planes of `word`'s bytes; False when the mask is all zero. `extent`
        (from the sparse inflater) gives the values and the box without reading the mask."""
        nz, ny, nx = self.grid.shape
        if extent is not None:
            if extent.value_or > 1:
                self._not_binary(int(flat.max()), path)
            if extent.box is None:
                return False
            z0, z1, y0, y1, x0, x1 = extent.box
            slab = flat[z0 * ny * nx : z1 * ny * nx].reshape(z1 - z0, ny, nx)
        else:
            per_slice = flat.reshape(nz, ny * nx).max(axis=1)  # one pass: validation and z-range
            top = int(per_slice.max())
            if top == 0:
                return False
            if top > 1:
                self._not_binary(top, path)
            zs = per_slice.nonzero()[0]
            z0, z1 = int(zs[0]), int(zs[-1]) + 1
            slab = flat[z0 * ny * nx : z1 * ny * nx].reshape(z1 - z0, ny, nx)
            footprint = slab.max(axis=0) if z1 - z0 > 1 else slab[0]  # (y, x), element-wise over slices
            ys = footprint.max(axis=1).nonzero()[0]
            xs = footprint.max(axis=0).nonzero()[0]
            y0, y1, x0, x1 = int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1
        # whole rows y0..y1 of each slice: contiguous runs, cheaper to OR than the x-cut box (outside
        # x0..x1 they hold zeros, which OR nothing)
        rows = slab[:, y0:y1]
        ws = self._main
        parts = [(k, (word >> (8 * k)) & 0xFF) for k in range(N_BYTES) if (word >> (8 * k)) & 0xFF]
        for k, byte in parts:
            if byte == 1:
                src = rows
            elif len(parts) == 1 and rows.flags.writeable:  # the decode buffer: scale it in place
                src = np.multiply(rows, np.uint8(byte), out=rows)
            else:
                src = rows * np.uint8(byte)
            target = ws.planes[k, z0:z1, y0:y1]
            with self._plane_locks[k]:
                np.bitwise_or(target, src, out=target)
        with self._lock:
            ws.grow(word, [z0, z1, y0, y1, x0, x1])
            for k, _ in parts:
                ws.touched[k] = True
        return True

    def _not_binary(self, top: int, path: Path | None) -> None:
        raise InputError(f"volume {self.volume_id}: mask {path or '(unnamed)'} has values other than 0 and 1 "
                         f"(found {top}): expected a binary mask")

    # -- a label map --
    def add_labelmap(self, path: Path, lut: np.ndarray) -> tuple[bool, list[int]]:
        """Merge a label map through `lut` (class id -> channel word); returns (resampled, ids present)."""
        self._labelmap = True
        flat, resampled, _ = self._mask_voxels(path)
        if flat.dtype.kind == "f":
            if not np.isfinite(flat).all() or (flat != np.round(flat)).any():
                raise InputError(f"volume {self.volume_id}: label map {path} has non-integer values")
            flat = flat.astype(np.int64)
        if flat.size and (flat.min() < 0):
            raise InputError(f"volume {self.volume_id}: label map {path} has negative labels")
        top = int(flat.max()) if flat.size else 0
        if top < 1 << 16:
            present = np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False), minlength=top + 1))
        else:  # a huge class id: no table of that size (a corrupt or foreign label map)
            present = np.unique(flat)
        if top < lut.size:
            words = lut[flat].reshape(self.grid.shape)
        else:  # ids beyond the table map to no channel
            words = np.where(flat < lut.size, lut[np.minimum(flat, lut.size - 1)], np.uint32(0)).reshape(self.grid.shape)
        ws = self._main
        ws.whole = True
        for k in range(N_BYTES):
            byte_plane = ((words >> np.uint32(8 * k)) & np.uint32(0xFF)).astype(np.uint8)
            if byte_plane.any():
                np.bitwise_or(ws.planes[k], byte_plane, out=ws.planes[k])
                ws.touched[k] = True
        return resampled, [int(i) for i in present]

    def labels(self, out: np.ndarray | None = None, threads: int = 1, encode: bool = False) -> np.ndarray:
        """The packed (z, y, x) uint32 array (into `out` when given): the byte planes interleaved,
        in blocks of Z_CHUNK slices on `threads` threads. With `encode`, each non-empty block is also
        zstd-compressed as its zarr chunk right after it is written (`self.encoded`), and the voxels
        of each MEASURED channel are counted in its box of the byte planes (`self.voxels`)."""
        from numcodecs import Zstd

        shape = self.grid.shape
        codec = Zstd(level=ZSTD_LEVEL) if encode else None
        encoded: dict[int, bytes] = {}
        boxes = None if self._main.whole else [box[:2] for box in self._main.boxes.values()]
        measured = [(bit, box) for bit, box in self._main.boxes.items() if CHANNELS[bit] in MEASURED]
        counted: list[tuple[int, int]] = []  # (channel bit, voxels in one block)
        if out is None or out.shape != shape or out.dtype != np.uint32 or not out.flags.c_contiguous:
            out = np.empty(shape, np.uint32)
        as_bytes = out.view(np.uint8).reshape(*shape, 4)
        little = np.little_endian
        touched = [bool(self._main.touched[k]) for k in range(N_BYTES)]

        top = N_BYTES - 1  # the highest byte plane goes in as whole words: one contiguous widening copy
        # and a shift write all four bytes (the unused top ones zero), cheaper than byte-wise stores

        def block(z: int) -> None:
            words = out[z : z + Z_CHUNK]
            if touched[top]:
                np.copyto(words, self._main.planes[top, z : z + Z_CHUNK], casting="unsafe")
                np.left_shift(words, np.uint32(8 * top), out=words)
            else:
                words.fill(0)
            for k in range(top):
                if touched[k]:
                    as_bytes[z : z + Z_CHUNK, ..., k if little else 3 - k] = self._main.planes[k, z : z + Z_CHUNK]
            if codec is not None:
                part = out[z : z + Z_CHUNK]
                if any(z0 < z + Z_CHUNK and z1 > z for z0, z1 in boxes) if boxes is not None else part.any():
                    encoded[z // Z_CHUNK] = _encode_chunk(codec, part, (Z_CHUNK, *shape[1:]))
                if boxes is not None:
                    for bit, (z0, z1, y0, y1, x0, x1) in measured:
                        lo, hi = max(z0, z), min(z1, z + Z_CHUNK)
                        if lo < hi:
                            sub = self._main.planes[bit // 8, lo:hi, y0:y1, x0:x1]
                            counted.append((bit, int(np.count_nonzero(np.bitwise_and(sub, np.uint8(1 << bit % 8))))))

        starts = range(0, shape[0], Z_CHUNK)
        if threads > 1 and len(starts) > 1:
            list(_executor(threads).map(block, starts))
        else:
            for z in starts:
                block(z)
        self.encoded = encoded if encode else None
        if encode and boxes is not None:
            voxels = dict.fromkeys(MEASURED, 0)
            for bit, n in counted:
                voxels[CHANNELS[bit]] += n
            self.voxels = voxels
        return out

    def boxes(self) -> dict[str, list[int]] | None:
        """Bounding box of each non-empty channel (z0, z1, y0, y1, x0, x1), when every input was a mask."""
        if self._labelmap:
            return None
        return {CHANNELS[bit]: list(box) for bit, box in sorted(self._main.boxes.items())}


def _same_gzip_content(a: bytes, b: bytes) -> bool:
    """Two gzip files equal byte for byte but for MTIME (4 bytes), XFL and OS: the same content."""
    return len(a) == len(b) and a[:4] == b[:4] and a[10:] == b[10:]


def _group_identical(used: Sequence[tuple[Path, int]], volume_id: str) -> list[tuple[list[Path], int, bytes | None]]:
    """(paths, union of their words, bytes) per distinct content among the structure files.

    RadGenome ships many byte-identical files (every empty mask of a volume is the same gzip
    stream): identical bytes hold identical voxels, so such a group is decoded once and OR-ed with
    the union of its words, which is what OR-ing each file with its own word gives. The .gz files
    are read here (up to _PREREAD_MAX bytes in all; the rest are read, ungrouped, when merged).
    """
    tasks: list[list] = []
    by_size: dict[int, list[list]] = {}
    total = 0
    for path, word in used:
        if not path.name.endswith(".gz") or total > _PREREAD_MAX:
            tasks.append([[path], word, None])
            continue
        data = _read_bytes(path, volume_id)
        total += len(data)
        same = by_size.setdefault(len(data), [])
        for task in same:
            if _same_gzip_content(task[2], data):
                task[0].append(path)
                task[1] |= word
                break
        else:
            task = [[path], word, data]
            same.append(task)
            tasks.append(task)
    return [(paths, word, data) for paths, word, data in tasks]


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
    # chunk index -> zstd (level ZSTD_LEVEL) bytes of each non-empty Z_CHUNK-slice chunk of `labels`,
    # made while the chunk was in cache (merge_volume(encode=True)); write_volume stores them as they are
    encoded: dict[int, bytes] | None = None
    # MEASURED channel -> its voxel count (merge_volume(encode=True) of masks), stored for the attributes stage
    voxels: dict[str, int] | None = None

    @property
    def reference(self) -> CtGrid:
        return self.grid


def structure_files(mask_dir: Path, volume_id: str) -> list[Path]:
    if not mask_dir.is_dir():
        raise InputError(f"volume {volume_id}: mask folder not found: {mask_dir}")
    names = sorted((n for n in os.listdir(mask_dir) if n.endswith(MASK_SUFFIXES) and not n.startswith(".")),
                   key=str.lower if os.name == "nt" else None)  # the order of sorted Paths, without them
    files = [mask_dir / n for n in names]
    if not files:
        raise InputError(f"volume {volume_id}: no {MASK_SUFFIX} masks in {mask_dir}")
    seen: dict[str, Path] = {}
    for p in files:  # `lung.nii` next to `lung.nii.gz`: which one is right is unknowable
        other = seen.setdefault(structure_name(p), p)
        if other is not p:
            raise InputError(f"volume {volume_id}: structure {structure_name(p)!r} is given twice in {mask_dir}: "
                             f"{other.name} and {p.name}")
    return files


def open_masks(path: Path | str) -> zarr.Group:
    """A masks store of the regions stage, checked to be one and to be complete (`complete` written last)."""
    try:
        group = zarr.open_group(str(path), mode="r")
    except (FileNotFoundError, ValueError) as exc:
        raise InputError(f"{path}: not a masks store of the regions stage ({exc})") from None
    if group.attrs.get("complete") is not True or not isinstance(group.attrs.get("volume_ids"), list):
        raise InputError(f"{path}: masks store is incomplete (an interrupted or foreign write): rerun the regions "
                         "stage for this shard")
    return group


def structure_name(path: Path) -> str:
    name = path.name
    for suffix in MASK_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def merge_volume(
    volume_id: str,
    ct_path: Path,
    mask_dir: Path,
    table: LabelTable,
    threads: int = 1,
    vocabulary: str = DEFAULT_VOCABULARY,
    memory_cap_bytes: int | None = int(DEFAULT_MEMORY_CAP_GB * 2**30),
    out: np.ndarray | None = None,
    encode: bool = False,
) -> VolumeMasks:
    """Read every structure file of one volume once and OR its channel word into the packed array.

    `out`: a (z, y, x) uint32 array to write the result into (reused across volumes by `run_shard`).
    `encode`: also make, as the array is assembled, what `write_volume` stores besides it: the
    compressed zarr chunks (`VolumeMasks.encoded`) and the voxel counts (`VolumeMasks.voxels`).
    """
    ct_path, mask_dir = Path(ct_path), Path(mask_dir)
    grid = read_ct_grid(ct_path, volume_id, memory_cap_bytes, threads)
    files = structure_files(mask_dir, volume_id)
    vocab = table.vocabulary(vocabulary)
    check_known([structure_name(p) for p in files], table, vocabulary, volume_id, mask_dir)
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
    moved: set[Path] = set()
    try:
        tasks = _group_identical(used, volume_id)

        def merge_one(task: tuple[list[Path], int, bytes | None]) -> None:
            paths, word, data = task
            if merger.add_file(paths[0], word, data):
                moved.update(paths)

        if threads <= 1 or len(tasks) <= 1:
            for task in tasks:
                merge_one(task)
        else:
            list(_executor(threads).map(merge_one, tasks))
        labels = merger.labels(out, threads, encode)
        boxes = merger.boxes()
    finally:
        merger.release()
    resampled = [path.name for path, _ in used if path in moved]
    return VolumeMasks(labels, grid, unknown, resampled, len(files), len(used), available, boxes, merger.encoded,
                       merger.voxels)


def read_label_names(path: Path | str, volume_id: str | None = None) -> dict[int, str]:
    """A label map's class names, {id: name}: `id<TAB>name` lines (comments with #; e.g.
    TotalSegmentator's class map) or, for a `.json` file, an object {"id": "name", ...}.

    Errors name the file (and the volume, when given) and the offending line or entry."""
    path = Path(path)
    who = f"volume {volume_id}: " if volume_id else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{who}label names file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{who}cannot read label names {path}: {exc}") from None
    names: dict[int, str] = {}
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{who}{path}: not valid JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{who}{path}: expected a JSON object {{\"id\": \"name\"}}")
        items = [(k, v, f"entry {k!r}") for k, v in raw.items()]
    else:
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            items.append((parts[0], parts[1] if len(parts) > 1 else None, f"line {n}"))
    for key, name, where in items:
        try:
            idx = int(str(key).strip())
        except ValueError:
            idx = -1
        if idx < 0 or not isinstance(name, str) or not name.strip():
            raise InputError(f"{who}{path}, {where}: expected a class id >= 0 and a name (id<TAB>name)")
        if idx in names:
            raise InputError(f"{who}{path}, {where}: class id {idx} is given twice")
        names[idx] = name.strip()
    if not names:
        raise InputError(f"{who}{path}: no class names")
    return names


# ---- which vocabulary, and how much of it the label table knows -----------------------------------

AUTO_VOCABULARY = "auto"


def detect_vocabulary(names: Sequence[str], table: LabelTable) -> str:
    """The table vocabulary that knows (uses or deliberately leaves out) most of `names`; the default
    (`radgenome`) on a tie. RadGenome / SAT names are words with spaces ("left lung upper lobe"),
    TotalSegmentator's are snake_case ("lung_upper_lobe_left"): the two barely overlap."""
    scores = {v: sum(vocab.classify(n) != "unknown" for n in names) for v, vocab in table.vocabularies.items()}
    best = max(scores.values(), default=0)
    if scores.get(DEFAULT_VOCABULARY) == best:
        return DEFAULT_VOCABULARY
    return next(v for v, s in scores.items() if s == best)


def check_known(names: Sequence[str], table: LabelTable, vocabulary: str, volume_id: str, source: Path | str,
                what: str = "structure names") -> list[str]:
    """The names the vocabulary does not know; an InputError when they are most of them (a wrong
    vocabulary or another segmenter's output: the volume's regions would be mostly empty)."""
    vocab = table.vocabulary(vocabulary)
    unknown = sorted(n for n in set(names) if vocab.classify(n) == "unknown")
    if names and 2 * len(unknown) > len(set(names)):
        raise InputError(
            f"volume {volume_id}: {len(unknown)} of {len(set(names))} {what} in {source} are not in the label "
            f"table's {vocabulary!r} vocabulary: {unknown}. Set segmentation.vocabulary "
            f"({', '.join(table.vocabularies)}) if the detection was wrong, or map the names in the label table")
    return unknown


def is_labelmap_path(path: Path) -> bool:
    """A mask location that is one image file (a multi-label map), not a folder of structure files."""
    return path.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) and not path.is_dir()


@dataclass
class MaskSource:
    """Where a volume's masks are and how to read them (the segment table's mask columns)."""

    mask_path: str
    mask_format: str  # folder | labelmap
    vocabulary: str
    label_names: str  # JSON {id: name} for a label map, "" for a folder
    n_structures: int
    unknown: list[str]
    detected: bool  # the vocabulary was detected (segmentation.vocabulary: auto)

    def note(self) -> str:
        parts = [f"vocabulary {self.vocabulary}" + (" (detected)" if self.detected else "")]
        if self.unknown:
            parts.append(f"{len(self.unknown)} names not in the label table: {', '.join(self.unknown)}")
        return "; ".join(parts)


def describe_masks(volume_id: str, mask_path: Path | str, label_names: Path | str | None, table: LabelTable,
                   vocabulary: str = AUTO_VOCABULARY) -> MaskSource:
    """A precomputed mask location: a folder of per-structure files, or a label map file with its label
    names file; its vocabulary (given, or detected from the names); fails when most names are unknown."""
    mask_path = Path(mask_path)
    if vocabulary != AUTO_VOCABULARY:
        table.vocabulary(vocabulary)  # a ValueError naming the table's vocabularies
    if is_labelmap_path(mask_path):
        if not mask_path.is_file():
            raise InputError(f"volume {volume_id}: label map not found: {mask_path}")
        if not label_names:
            raise InputError(f"volume {volume_id}: {mask_path} is a label map but no label names file is given "
                             "(manifest column mask_label_names: an id<TAB>name TSV or a JSON {id: name})")
        names = read_label_names(label_names, volume_id)
        listed = [n for i, n in names.items() if i != 0]
        source: Path | str = label_names
        fmt, names_json, what = "labelmap", json.dumps({str(k): v for k, v in sorted(names.items())}), "label names"
    else:
        files = structure_files(mask_path, volume_id)
        listed = [structure_name(f) for f in files]
        source, fmt, names_json, what = mask_path, "folder", "", "structure names"
    vocab = detect_vocabulary(listed, table) if vocabulary == AUTO_VOCABULARY else vocabulary
    unknown = check_known(listed, table, vocab, volume_id, source, what)
    return MaskSource(str(mask_path), fmt, vocab, names_json, len(listed), unknown, vocabulary == AUTO_VOCABULARY)


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
    check_known([n for i, n in label_names.items() if i != 0], table, vocabulary, volume_id, labelmap,
                "label names")
    top = max(label_names, default=0)
    lut = np.zeros(top + 1, np.uint32)
    unknown_names: list[str] = []
    n_used = 0
    for idx, name in label_names.items():
        if idx == 0:  # background ("0<TAB>background" in some class maps)
            continue
        kind = vocab.classify(name)
        if kind == "used":
            lut[idx] = vocab.bits[name]
            n_used += 1
        elif kind == "unknown":
            unknown_names.append(name)
    merger = _Merger(volume_id, grid, memory_cap_bytes)
    try:
        moved, present_ids = merger.add_labelmap(labelmap, lut)
        labels = merger.labels()
    finally:
        merger.release()
    unknown_names += [f"label {i}" for i in present_ids if i != 0 and i not in label_names]
    present = [label_names.get(i, f"label {i}") for i in present_ids if i != 0]
    check_known(present, table, vocabulary, volume_id, labelmap, "labels present")
    available = int(np.bitwise_or.reduce(lut)) if lut.size else 0
    return VolumeMasks(labels, grid, sorted(set(unknown_names)), [labelmap.name] if moved else [],
                       1, n_used, available)


# ---- QC picture -----------------------------------------------------------------------------------



def qc_picture(ct_path: Path, labels: np.ndarray, grid: CtGrid, volume_id: str, out_png: Path) -> None:
    """Three axial and two coronal CT slices with the region (filled) and lesion (outlined) overlays, in the
    radiological convention (patient right on the image's left; anterior up, coronal: superior up); the
    CT is turned to the canonical grid of `labels` first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    image = read_image(ct_path, volume_id)
    # canonical LPS grid, as the masks: an axial slice [y, x] is then drawn in the radiological
    # convention as it is (patient right on the image's left, anterior up); a coronal one with z reversed
    ct = reorientation(image.GetDirection()).array(image_array(image, ct_path, volume_id, np.float32))
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
        for x, side in ((0.01, "R"), (0.93, "L")):  # radiological convention: patient right on the left
            ax.text(x, 0.5, side, transform=ax.transAxes, color="yellow", fontsize=8, va="center")
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
    """Per volume: CT path and where its masks are: the segment table's row, or else the manifest's
    `mask_dir` / `mask_label_names`, described (format, vocabulary) when the volume is merged."""
    from pipeline.cohort import validate_volume_id

    rows = manifest[manifest["shard"] == shard]
    seg = segment.set_index("volume_id") if segment is not None and len(segment) else None
    out = []
    for row in rows.itertuples(index=False):
        names_file = getattr(row, "mask_label_names", "")
        item = {"volume_id": row.volume_id, "ct_path": row.ct_path, "mask_path": getattr(row, "mask_dir", ""),
                "mask_format": "folder", "vocabulary": DEFAULT_VOCABULARY, "label_names": "",
                "status": "ok", "error": "", "describe": True,
                "label_names_file": names_file if isinstance(names_file, str) else ""}
        if seg is not None and row.volume_id in seg.index:
            item["describe"] = False
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
                   memory_cap_bytes: int | None, out: np.ndarray | None = None, encode: bool = False) -> VolumeMasks:
    """One volume's packed masks, on the canonical (LPS) grid (`to_canonical`)."""
    vid, ct_path = str(item["volume_id"]), Path(str(item["ct_path"]))
    if item.get("describe"):  # no segment table row: the manifest's masks, their layout and vocabulary found here
        src = describe_masks(vid, Path(str(item["mask_path"])), str(item.get("label_names_file") or ""), table)
        item = {**item, "mask_format": src.mask_format, "vocabulary": src.vocabulary, "label_names": src.label_names}
    if encode:
        header = read_header_info(ct_path, vid)  # a CT that is not 3D is refused, with its reason, by the merge
        if header.GetDimension() == 3 and not _turn(header.GetDirection(), ct_path).identity:
            encode = False  # the chunks are made after the array is turned
    if item["mask_format"] == "labelmap":
        vm = merge_labelmap(vid, ct_path, Path(str(item["mask_path"])),
                            {int(k): v for k, v in json.loads(str(item["label_names"])).items()},
                            table, str(item["vocabulary"]), memory_cap_bytes)
    else:
        vm = merge_volume(vid, ct_path, Path(str(item["mask_path"])), table, threads, str(item["vocabulary"]),
                          memory_cap_bytes, out, encode)
    return to_canonical(vm, ct_path)


def _turn(direction: Sequence[float], ct_path: Path | str) -> Reorientation:
    try:
        return reorientation(direction)
    except ValueError as exc:
        raise InputError(f"{ct_path}: {exc}") from None


def to_canonical(vm: VolumeMasks, ct_path: Path | str) -> VolumeMasks:
    """The volume's masks on the canonical grid (`pipeline.orientation`: LPS, identity direction).

    Masks are merged on the CT's own grid (the fast path reads them as stored); this moves the packed
    array once per volume, an exact transpose / flip, with its geometry and channel boxes. A CT already
    in LPS (the demo, RadGenome) is left as it is: the same array, chunks and attributes."""
    turn = _turn(vm.grid.direction, ct_path)
    if turn.identity:
        return vm
    shape = vm.labels.shape
    size, spacing, origin, direction = turn.grid(vm.grid.size, vm.grid.spacing, vm.grid.origin, vm.grid.direction)
    grid = CtGrid(size, spacing, origin, direction, None)  # type: ignore[arg-type]
    boxes = None if vm.boxes is None else {c: turn.box(b, shape) for c, b in vm.boxes.items()}
    return VolumeMasks(np.ascontiguousarray(turn.array(vm.labels)), grid, vm.unknown, vm.resampled, vm.n_files,
                       vm.n_used, vm.available, boxes, None, vm.voxels)  # chunks are compressed again when written


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
    decoder: str = "auto",
) -> pd.DataFrame:
    log = setup_logging()
    used = set_decoder(decoder)
    if decoder == "auto" and "libdeflate" not in used and LIBDEFLATE_PROBLEM:
        log.warning("libdeflate unavailable (%s): files the sparse inflater does not take are inflated by zlib",
                    LIBDEFLATE_PROBLEM)
    log.info("mask decoder: %s (regions.decoder: %s)", used, decoder)
    # A shard starts with no buffers, as a workflow job (one process per shard) does: reuse from an
    # earlier call in the same process would flatter in-process benchmarks, not help the workflow.
    with _POOL_LOCK:
        _POOL.clear()
        _EDGE.clear()
    items = _segment_rows(manifest, segment, shard)
    cap = int(memory_cap_gb * 2**30) if memory_cap_gb else None
    qc: list[dict[str, object]] = []
    picture_ids = set(sample_for_pictures([str(i["volume_id"]) for i in items if i["status"] == "ok"], n_pictures))
    with atomic_output(out_zarr) as tmp_zarr, _picture_dir(pictures) as tmp_pics:
        group = zarr.open_group(str(tmp_zarr), mode="w", zarr_format=3)
        done: list[str] = []
        out_buffer: np.ndarray | None = None  # the output array, reused from volume to volume of this shard
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
                vm = process_volume(item, table, threads, cap, out_buffer, encode=True)
                out_buffer = vm.labels  # reused for the next volume of the same size
                write_volume(group, vid, vm, tmp_zarr, max(threads, 1))
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
        group.update_attributes({"channels": list(CHANNELS), "table_version": table.version,  # one write
                                 "orientation": CANONICAL, "decoder": used, "volume_ids": done,
                                 "complete": True})
    qc_df = pd.DataFrame(qc, columns=list(QC_COLUMNS)).assign(decoder=used)
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


def write_volume(group: zarr.Group, volume_id: str, vm: VolumeMasks, root: Path | None = None,
                 threads: int = 2) -> None:
    """One volume's packed array (z-chunks of Z_CHUNK slices, zstd level ZSTD_LEVEL) and its attributes.

    With `root` (the group's folder on local disk) the chunks are compressed on `threads` threads
    (or taken as `vm.encoded` made them) and written as files in zarr v3's default layout
    (`<volume>/c/<k>/0/0`; all-zero chunks left out, as zarr does): the same bytes zarr writes,
    without its per-chunk copies.
    """
    labels = vm.labels
    chunks = (min(Z_CHUNK, max(1, labels.shape[0])), *labels.shape[1:])
    attrs: dict[str, object] = {"spacing": list(vm.grid.spacing), "origin": list(vm.grid.origin),
                                "direction": list(vm.grid.direction),
                                "channels_available": channel_names(vm.available)}
    if vm.boxes is not None:
        attrs["channel_boxes"] = vm.boxes
    if vm.voxels is not None:
        attrs["channel_voxels"] = vm.voxels
    # attributes go in with the array's metadata: one zarr.json write, not one per key
    arr = group.create_array(volume_id, shape=labels.shape, dtype=np.uint32, chunks=chunks,
                             compressors=ZstdCodec(level=ZSTD_LEVEL), fill_value=0, attributes=attrs)
    if root is None or not _write_chunks(arr, labels, root / volume_id, chunks, threads, vm.boxes, vm.encoded):
        arr[...] = labels


def _write_chunks(arr: zarr.Array, labels: np.ndarray, folder: Path, chunks: tuple[int, ...], threads: int = 2,
                  boxes: dict[str, list[int]] | None = None, encoded: dict[int, bytes] | None = None) -> bool:
    """Write the chunk files directly; False (nothing written) when the array is not the expected kind.

    `boxes` (each non-empty channel's bounding box): a chunk no box reaches is all zero, and left out
    without looking at it. `encoded` (chunk index -> zstd ZSTD_LEVEL bytes of every non-empty chunk
    of Z_CHUNK slices, as `_Merger.labels` makes them): written as they are.
    """
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
    if encoded is not None and depth == Z_CHUNK and compressors[0].level == ZSTD_LEVEL:
        for k, blob in sorted(encoded.items()):
            target = folder / "c" / str(k) / "0"
            target.mkdir(parents=True, exist_ok=True)
            (target / "0").write_bytes(blob)
        return True

    def one(k: int) -> None:
        part = labels[k * depth : (k + 1) * depth]
        if boxes:
            if not any(z0 < (k + 1) * depth and z1 > k * depth for z0, z1, *_ in boxes.values()):
                return
        elif not part.any():
            return
        target = folder / "c" / str(k) / "0"
        target.mkdir(parents=True, exist_ok=True)
        (target / "0").write_bytes(_encode_chunk(codec, part, chunks))

    n = -(-labels.shape[0] // depth)
    if threads > 1 and n > 1:
        list(_executor(threads).map(one, range(n)))
    else:
        for k in range(n):
            one(k)
    return True


_EDGE: dict[tuple[int, ...], list[np.ndarray]] = {}  # full-size scratch chunks for edge chunks, reused


def _edge_buffer(chunk_shape: tuple[int, ...]) -> np.ndarray:
    with _POOL_LOCK:
        for other in [s for s in _EDGE if s != chunk_shape]:
            del _EDGE[other]
        free = _EDGE.setdefault(chunk_shape, [])
        return free.pop() if free else np.empty(chunk_shape, np.uint32)


def _edge_done(buf: np.ndarray) -> None:
    with _POOL_LOCK:
        free = _EDGE.setdefault(buf.shape, [])
        if len(free) < 2:
            free.append(buf)


def _encode_chunk(codec: object, part: np.ndarray, chunk_shape: tuple[int, ...]) -> bytes:
    """One zarr chunk's bytes: little-endian uint32, an edge chunk padded to full size with the fill value."""
    if part.shape[0] >= chunk_shape[0]:
        return codec.encode(np.ascontiguousarray(part, dtype="<u4"))  # type: ignore[attr-defined]
    full = _edge_buffer(chunk_shape)
    try:
        full[: part.shape[0]] = part
        full[part.shape[0] :] = 0
        return codec.encode(np.ascontiguousarray(full, dtype="<u4"))  # type: ignore[attr-defined]
    finally:
        _edge_done(full)


def _zstd_content_size(data: bytes) -> int | None:
    """The decompressed size a zstd frame header declares (RFC 8878 3.1.1.1), None when absent."""
    if len(data) < 6 or data[:4] != b"\x28\xb5\x2f\xfd":
        return None
    fhd = data[4]
    single, did_flag, fcs_flag = fhd >> 5 & 1, fhd & 3, fhd >> 6
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    if size == 0 or len(data) < pos + size:
        return None
    value = int.from_bytes(data[pos : pos + size], "little")
    return value + 256 if size == 2 else value


def read_labels(arr: zarr.Array, folder: Path | None = None, out: np.ndarray | None = None,
                threads: int = 1) -> np.ndarray:
    """One volume's packed array, as `arr[...]` reads it.

    With `folder` (the array's directory on local disk) and the layout `write_volume` writes (zstd,
    no filters, little-endian uint32, fill 0, z-chunks of whole slices, default chunk keys), the
    chunk files are decoded straight into `out` (reused when its shape fits; absent chunk = all
    fill value), on `threads` threads (zstd releases the GIL), without zarr's per-chunk buffers and
    copies. Anything else is read by zarr.
    """
    from numcodecs import Zstd

    shape = tuple(arr.shape)
    meta = arr.metadata
    encoding = getattr(meta, "chunk_key_encoding", None)
    compressors = arr.compressors
    chunks = tuple(arr.chunks)
    if (folder is None or len(shape) != 3 or arr.dtype != np.uint32 or getattr(meta, "zarr_format", 3) != 3
            or getattr(encoding, "name", None) != "default" or getattr(encoding, "separator", None) != "/"
            or len(compressors) != 1 or not isinstance(compressors[0], ZstdCodec) or arr.filters
            or str(getattr(getattr(arr.serializer, "endian", None), "value", "")) != "little"
            or chunks[1:] != shape[1:] or arr.fill_value != 0 or getattr(arr, "shards", None) is not None
            or not (folder / "zarr.json").is_file()):
        return np.asarray(arr[...])
    if out is None or out.shape != shape or out.dtype != np.uint32 or not out.flags.c_contiguous:
        out = np.empty(shape, np.uint32)
    codec, depth = Zstd(), chunks[0]

    def one(k: int) -> None:
        part = out[k * depth : (k + 1) * depth]
        path = folder / "c" / str(k) / "0" / "0"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            part[...] = 0
            return
        target = part if part.shape[0] == depth else _edge_buffer(chunks)  # edge chunk: decoded at full size
        try:
            if _zstd_content_size(data) == target.nbytes:  # zstd checks the frame decodes to exactly that
                codec.decode(data, out=target)
            else:
                flat = np.frombuffer(codec.decode(data), np.uint8)
                if flat.size != target.nbytes:
                    raise ValueError(f"{flat.size} bytes, expected {target.nbytes}")
                target.view(np.uint8).reshape(-1)[...] = flat
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"{path}: unreadable chunk ({exc})") from None
        if target is not part:
            part[...] = target[: part.shape[0]]
            _edge_done(target)

    n = -(-shape[0] // depth)
    if threads > 1 and n > 1:
        list(_executor(threads).map(one, range(n)))
    else:
        for k in range(n):
            one(k)
    if np.dtype("<u4") != np.dtype(np.uint32):  # big-endian host: the stored bytes are little-endian
        out.byteswap(inplace=True)
    return out


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
    ap.add_argument("--decoder", choices=DECODERS, default="auto",
                    help="mask decoder: auto (sparse inflater, libdeflate, zlib as available) or one of them")
    args = ap.parse_args(argv)
    manifest = pd.read_parquet(args.manifest)
    segment = pd.read_parquet(args.segment) if args.segment else None
    qc = run_shard(manifest, args.shard, LabelTable.load(args.table), args.out, args.qc, args.on_error,
                   args.threads, segment, args.pictures, args.n_pictures, args.memory_cap_gb, args.decoder)
    print(json.dumps(qc["status"].value_counts().to_dict()))


if __name__ == "__main__":
    main()
