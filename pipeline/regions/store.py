"""The masks store: one Zarr v3 group per shard, one uint32 array per volume in z-chunks of Z_CHUNK
slices; the chunk files written and read directly (the same bytes zarr writes and reads).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from pipeline.io import InputError
from pipeline.regions.table import channel_names
from pipeline.regions.workspace import _POOL_LOCK, _executor

if TYPE_CHECKING:  # merge imports this module
    from pipeline.regions.merge import VolumeMasks

Z_CHUNK = 16
# zstd's fast level -1: on these arrays (long runs of a few words) ~25% less compression time than
# level 1 for ~7% larger chunks (0.34 vs 0.32 MB for a RadGenome-size volume); the same values read back
ZSTD_LEVEL = -1


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
