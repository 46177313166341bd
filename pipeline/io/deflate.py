"""Fast mask decoding: gzip inflated by libdeflate or the sparse inflater into reused buffers.

Reading 210 structure files of a RadGenome-size volume through SimpleITK spends most of its time in
zlib and in allocating a fresh image per file. Masks on the CT's own grid take this path instead: the
NIfTI-1 header is parsed (`pipeline.io.nifti.parse_nifti_header`, its geometry fields compared byte
for byte with the CT's), and the gzip stream is inflated by libdeflate (the `deflate` package, bound
here through ctypes) straight into a per-thread buffer that is reused from file to file; ctypes
releases the GIL, so threads decode files in parallel. uint8 masks are inflated by the compiled
sparse inflater (`pipeline._sparse_gunzip`, built by setup.py from pipeline/_sparse_gunzip.c), which
writes only their non-zero bytes. Without either, zlib. Anything unusual (NIfTI-2, scaled values,
another grid, another format) goes through SimpleITK.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io.errors import InputError

LIBDEFLATE_SYMBOLS = ("libdeflate_alloc_decompressor", "libdeflate_gzip_decompress_ex", "libdeflate_free_decompressor")


def _load_libdeflate() -> tuple[Any, str]:
    """libdeflate's C functions from the `deflate` wheel, or None and the reason (zlib is used then).

    The wheel does not export libdeflate as a public API: the functions are looked up in its compiled
    module by name, and each one is checked here, at import, so a release that hides them means a clear
    fallback (logged by the regions stage, recorded in its QC table) instead of an error mid-run.
    """
    try:
        import ctypes

        import deflate._deflate as native
    except ImportError as exc:
        return None, f"the deflate package is not importable ({exc})"
    try:
        lib = ctypes.CDLL(native.__file__)
    except OSError as exc:
        return None, f"{native.__file__} cannot be loaded ({exc})"
    missing = [name for name in LIBDEFLATE_SYMBOLS if not hasattr(lib, name)]
    if missing:
        import deflate

        return None, f"deflate {getattr(deflate, '__version__', '?')} does not export {', '.join(missing)}"
    lib.libdeflate_alloc_decompressor.restype = ctypes.c_void_p
    lib.libdeflate_alloc_decompressor.argtypes = []
    size_p = ctypes.POINTER(ctypes.c_size_t)
    lib.libdeflate_gzip_decompress_ex.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                                  ctypes.c_void_p, ctypes.c_size_t, size_p, size_p]
    lib.libdeflate_gzip_decompress_ex.restype = ctypes.c_int
    lib.libdeflate_free_decompressor.argtypes = [ctypes.c_void_p]
    lib.libdeflate_free_decompressor.restype = None
    return lib, ""


_LIBDEFLATE, LIBDEFLATE_PROBLEM = _load_libdeflate()

# Which decoder inflates mask files (config `regions.decoder`): `auto` takes the sparse inflater for
# uint8 masks on the CT grid and libdeflate for everything else, each when available, else zlib;
# `sparse`, `libdeflate` and `zlib` insist on one (an unavailable one is an error, not a fallback).
DECODERS = ("auto", "sparse", "libdeflate", "zlib")
_DECODER = "auto"


def set_decoder(name: str) -> str:
    """Choose the mask decoder for this process; returns what will be used (see `decoder_in_use`)."""
    global _DECODER
    if name not in DECODERS:
        raise ValueError(f"decoder {name!r} is not one of {DECODERS}")
    if name == "sparse" and _SPARSE is None:
        raise RuntimeError("decoder 'sparse' asked for, but pipeline/_sparse_gunzip.c was not built "
                           "(pip install -e . with a C compiler)")
    if name == "libdeflate" and _LIBDEFLATE is None:
        raise RuntimeError(f"decoder 'libdeflate' asked for, but it is unavailable: {LIBDEFLATE_PROBLEM}")
    _DECODER = name
    return decoder_in_use()


def decoder_in_use() -> str:
    """`sparse+libdeflate`, `sparse+zlib`, `libdeflate` or `zlib`: the sparse inflater (uint8 masks on the
    CT grid) and the decoder of every other file."""
    general = "libdeflate" if _LIBDEFLATE is not None and _DECODER in ("auto", "sparse", "libdeflate") else "zlib"
    return f"sparse+{general}" if _SPARSE is not None and _DECODER in ("auto", "sparse") else general


def gzip_decoder_name() -> str:
    return decoder_in_use().split("+")[-1]


MAX_DEFLATE_RATIO = 1032  # the most a deflate stream can expand


class Inflater:
    """A libdeflate decompressor and a growing output buffer, reused from file to file.

    Use one per thread. `inflate` returns a view into the buffer, valid until the next call.
    """

    def __init__(self) -> None:
        self.buf = np.empty(0, np.uint8)
        use = _LIBDEFLATE is not None and _DECODER != "zlib"
        self._dec = _LIBDEFLATE.libdeflate_alloc_decompressor() if use else None

    def __del__(self) -> None:
        if self._dec is not None and _LIBDEFLATE is not None:
            try:
                _LIBDEFLATE.libdeflate_free_decompressor(self._dec)
            except Exception:  # noqa: BLE001 - interpreter shutdown
                pass
            self._dec = None

    def inflate(self, data: bytes, size: int, path: Path, volume_id: str) -> np.ndarray:
        """Inflate a whole .gz file's bytes -> uint8 view of exactly `size` bytes.

        The stream must inflate to exactly `size` bytes (what its NIfTI header implies): a truncated,
        corrupt (CRC) or over-long file is an InputError naming volume and file. A header that
        implies more bytes than `data` can inflate to (deflate's ratio is at most 1032:1) is refused
        before the buffer is grown.
        """
        if size > MAX_DEFLATE_RATIO * len(data) + 4096:
            raise InputError(f"volume {volume_id}: {path} is truncated or its header is corrupt (its NIfTI header "
                             f"implies {size} bytes, more than its {len(data)} gzip bytes can hold)")
        if self.buf.size < size:
            self.buf = np.empty(max(size, 1 << 20), np.uint8)
        if self._dec is None:
            return _inflate_zlib(data, size, self.buf, path, volume_id)
        import ctypes

        in_used, out_used = ctypes.c_size_t(), ctypes.c_size_t()
        pos, done, base = 0, 0, self.buf.ctypes.data
        view = memoryview(data)
        while pos < len(data):  # one gzip member per round (multi-member files are valid gzip)
            chunk = view[pos:].tobytes() if pos else data
            ret = _LIBDEFLATE.libdeflate_gzip_decompress_ex(self._dec, chunk, len(chunk), base + done, size - done,
                                                            ctypes.byref(in_used), ctypes.byref(out_used))
            if ret != 0:
                what = {1: "truncated or corrupt", 2: "truncated",
                        3: "corrupt or longer than its header says"}.get(ret, "unreadable")
                raise InputError(f"volume {volume_id}: {path} is {what} (its gzip stream does not inflate to "
                                 f"the {size} bytes its NIfTI header implies)")
            pos += in_used.value
            done += out_used.value
            if done >= size and pos < len(data) and not any(view[pos:]):
                break  # zero padding after the last member
        if done != size:
            raise InputError(f"volume {volume_id}: {path} is truncated ({done} of {size} bytes)")
        return self.buf[:size]


def _load_sparse_gunzip():
    """The compiled sparse inflater (pipeline/_sparse_gunzip.c), or None when it was not built."""
    try:
        from pipeline import _sparse_gunzip

        return _sparse_gunzip
    except ImportError:
        return None


_SPARSE = _load_sparse_gunzip()
_SPARSE_PROBLEMS = {1: "truncated", 2: "corrupt", 3: "longer than its NIfTI header says",
                    4: "corrupt (its gzip CRC or length does not match)", 5: "not a gzip file"}


@dataclass(frozen=True)
class MaskExtent:
    """What the sparse inflater saw of a uint8 mask: OR of all voxel values (<= 1 for a 0/1 mask) and
    the bounding box of the non-zero voxels (z0, z1, y0, y1, x0, x1), None when the mask is empty."""

    value_or: int
    box: tuple[int, int, int, int, int, int] | None


class SparseInflater:
    """Inflates .nii.gz masks into an all-zero buffer, writing only their non-zero bytes (see
    pipeline/_sparse_gunzip.c): the zero runs that make up most of a mask are never written or read.

    Use one per thread. `inflate` returns a view valid until the next call, which first zeroes the
    rows the previous file wrote. `available()` is False when the C extension was not built.
    """

    def __init__(self) -> None:
        self.buf = np.zeros(0, np.uint8)
        self.dirty = np.zeros(0, np.uint8)
        self._layout: tuple[int, int, int] | None = None  # (vox_offset, nx, ny) of the last file
        self._head_end = 0

    @staticmethod
    def available() -> bool:
        return _SPARSE is not None and _DECODER in ("auto", "sparse")

    def _clear(self) -> None:
        if self._layout is not None:
            vox, nx, ny = self._layout
            size = vox + self.dirty.size * nx
            _SPARSE.clear(self.buf[:size], vox, nx, ny, self.dirty, self._head_end)
            self._layout = None

    def inflate(self, data: bytes, size: int, vox_offset: int, shape: tuple[int, int, int], path: Path,
                volume_id: str) -> tuple[np.ndarray, MaskExtent]:
        """Inflate a whole .gz file of a uint8 NIfTI image of `shape` (z, y, x) whose voxels start at
        `vox_offset` -> (uint8 view of exactly `size` bytes, its MaskExtent). Errors as Inflater.inflate."""
        nz, ny, nx = shape
        if size != vox_offset + nz * ny * nx:
            raise ValueError(f"{size} bytes is not a {vox_offset}-byte header and {nz}x{ny}x{nx} voxels")
        if size > MAX_DEFLATE_RATIO * len(data) + 4096:
            raise InputError(f"volume {volume_id}: {path} is truncated or its header is corrupt (its NIfTI header "
                             f"implies {size} bytes, more than its {len(data)} gzip bytes can hold)")
        self._clear()
        if self.buf.size < size:
            self.buf = np.zeros(max(size, 1 << 20), np.uint8)
        if self.dirty.size != nz * ny:
            self.dirty = np.zeros(nz * ny, np.uint8)
        out = self.buf[:size]
        status, produced, head_end, value_or, box = _SPARSE.gunzip(data, out, vox_offset, nx, ny, self.dirty)
        self._layout, self._head_end = (vox_offset, nx, ny), head_end
        if status != 0:
            raise InputError(f"volume {volume_id}: {path} is {_SPARSE_PROBLEMS.get(status, 'unreadable')} (its gzip "
                             f"stream does not inflate to the {size} bytes its NIfTI header implies)")
        if produced != size:
            raise InputError(f"volume {volume_id}: {path} is truncated ({produced} of {size} bytes)")
        return out, MaskExtent(value_or, tuple(box) if box[1] > box[0] else None)


_INFLATERS = __import__("threading").local()


def inflate_into(data: bytes, size: int, path: Path, volume_id: str) -> np.ndarray:
    """`Inflater.inflate` with this thread's own inflater (see there)."""
    inflater = getattr(_INFLATERS, "inflater", None)
    if inflater is None:
        inflater = _INFLATERS.inflater = Inflater()
    return inflater.inflate(data, size, path, volume_id)


def _inflate_zlib(data: bytes, size: int, buf: np.ndarray, path: Path, volume_id: str) -> np.ndarray:
    done, rest = 0, data
    try:
        while rest and done < size:
            d = zlib.decompressobj(31)
            while True:
                out = d.decompress(rest, 1 << 22)
                n = len(out)
                if done + n > size:
                    raise InputError(f"volume {volume_id}: {path} is longer than its NIfTI header says")
                buf[done : done + n] = np.frombuffer(out, np.uint8)
                done += n
                rest = d.unconsumed_tail
                if d.eof or not out:
                    break
            if not d.eof:
                raise zlib.error("incomplete gzip stream")
            rest = d.unused_data
    except zlib.error as exc:
        raise InputError(f"volume {volume_id}: {path} is truncated or corrupt ({exc})") from None
    if done != size:
        raise InputError(f"volume {volume_id}: {path} is truncated ({done} of {size} bytes)")
    return buf[:size]
