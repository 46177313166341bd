"""Merging one volume's masks into the packed channel array: structure files (the fast path and the
SimpleITK path, identical files decoded once) and label maps; where a volume's masks are and what
vocabulary they use. See `pipeline.regions` for how a volume is merged.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.constants import ATTRIBUTE_STRUCTURES, CHANNELS, LESIONS
from pipeline.io import (
    InputError,
    MaskExtent,
    SparseInflater,
    check_memory,
    image_array,
    parse_nifti_header,
    read_header_info,
    read_image,
)
from pipeline.regions.grid import DEFAULT_MEMORY_CAP_GB, CtGrid, _bounds, read_ct_grid
from pipeline.regions.store import Z_CHUNK, ZSTD_LEVEL, _encode_chunk
from pipeline.regions.table import AUTO_VOCABULARY, DEFAULT_VOCABULARY, LabelTable, check_known, detect_vocabulary
from pipeline.regions.workspace import N_BYTES, _executor, _give_back, _take_workspace, _Workspace

MASK_SUFFIX = ".nii.gz"
MASK_SUFFIXES = (".nii.gz", ".nii")


# channels whose voxels the regions stage counts (array attribute `channel_voxels`): the attributes
# stage's organ volumes and lesion checks, counted here in the uint8 byte planes while they are
# interleaved (a quarter of the bytes of the packed words, on the job's threads)
MEASURED: tuple[str, ...] = (*ATTRIBUTE_STRUCTURES, *LESIONS)
_PREREAD_MAX = 256 << 20  # compressed bytes per volume read up front to find identical files


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
