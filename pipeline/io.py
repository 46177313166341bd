"""Small I/O helpers every stage uses: atomic writes and CT/mask reading with clear errors."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk


class InputError(RuntimeError):
    """Bad input data: the message names the volume and the file."""


def atomic_path(path: Path) -> Path:
    """The temporary sibling a file is written to before being renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>*` siblings of `path` left by writers that no longer run (killed jobs).

    A job killed with SIGKILL cannot clean up after itself; its rerun (another pid) removes what it
    left. A sibling whose process still runs on this machine is left alone.
    """
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        digits = p.name[len(prefix):].split(".", 1)[0]
        if digits.isdigit() and int(digits) != os.getpid() and not _pid_alive(int(digits)):
            try:
                _remove(p)
                removed.append(p)
            except OSError:
                pass  # removed by another rerun at the same moment
    return removed


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `path`, on failure remove it.

    Works for files and directories (e.g. a Zarr store), so an interrupted job never leaves an
    output that looks complete; what a killed earlier attempt left is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = atomic_path(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_parquet(df: pd.DataFrame, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def _float_offset(value: float) -> int | None:
    """NIfTI-1 stores vox_offset as a float: its integer value, None when NaN or infinite."""
    return int(value) if math.isfinite(value) else None


def _nifti_expected_size(head: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 occupies uncompressed (header + extensions + voxels), if known."""
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = _float_offset(struct.unpack(endian + "f", head[108:112])[0])
            if offset is None:
                return None
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            offset = struct.unpack(endian + "q", head[168:176])[0]
        else:
            continue
        n = 1
        for d in dim[1 : 1 + max(0, min(int(dim[0]), 7))]:
            n *= max(int(d), 1)
        return max(offset, 352) + n * bitpix // 8
    return None


def check_gzip_complete(path: Path, volume_id: str) -> None:
    """Reject a truncated or corrupt .nii.gz before ITK reads it.

    ITK's NIfTI reader zero-fills a truncated gzip stream without any error, so a half-copied volume
    would silently become a scan with an empty lower half. The gzip trailer holds the uncompressed
    size (mod 2^32); when it disagrees with the size the NIfTI header implies, the whole stream is
    decompressed to tell a multi-member file from a broken one.
    """
    try:
        with gzip.open(path, "rb") as fh:
            head = fh.read(544)
        with open(path, "rb") as fh:
            fh.seek(-4, os.SEEK_END)
            trailer = struct.unpack("<I", fh.read(4))[0]
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"volume {volume_id}: {path} is not a readable gzip file ({exc})") from None
    expected = _nifti_expected_size(head)
    if expected is None or expected % 2**32 == trailer:
        return
    verify_gzip_stream(path, volume_id)


def verify_gzip_stream(path: Path, volume_id: str) -> None:
    """Inflate the whole stream (CRC and length checked); a broken one is an InputError naming the file."""
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"volume {volume_id}: {path} is truncated or corrupt ({exc})") from None


def check_complete(path: Path, volume_id: str) -> None:
    """Reject a truncated NIfTI (.nii.gz: see check_gzip_complete; .nii: shorter than its header says).

    ITK's NIfTI reader zero-fills the missing voxels of either without an error.
    """
    if path.name.endswith(".nii.gz"):
        check_gzip_complete(path, volume_id)
    elif path.name.endswith(".nii"):
        try:
            with open(path, "rb") as fh:
                head = fh.read(544)
            size = path.stat().st_size
        except OSError as exc:
            raise InputError(f"volume {volume_id}: cannot read {path} ({exc})") from None
        expected = _nifti_expected_size(head)
        if expected is not None and size < expected:
            raise InputError(f"volume {volume_id}: {path} is truncated ({size} of the {expected} bytes "
                             "its NIfTI header implies)")


DEFAULT_MAX_IMAGE_GB = 8.0


def max_image_bytes() -> int:
    """The default cap on one image's voxel bytes: env MEDREGION_MAX_IMAGE_GB (GiB), else 8 GiB."""
    raw = os.environ.get("MEDREGION_MAX_IMAGE_GB", "")
    try:
        gb = float(raw) if raw.strip() else DEFAULT_MAX_IMAGE_GB
    except ValueError:
        gb = DEFAULT_MAX_IMAGE_GB
    return int(gb * 2**30) if math.isfinite(gb) and gb > 0 else int(DEFAULT_MAX_IMAGE_GB * 2**30)


def image_nbytes(reader: sitk.ImageFileReader) -> int:
    """Bytes of the voxel buffer SimpleITK allocates for an image, from its header alone."""
    n = 1
    for d in reader.GetSize():
        n *= int(d)
    name = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = [int(b) for b in re.findall(r"(\d+)-bit", name)] or [64]
    per_component = bits[0] // 8 * (2 if "complex" in name else 1)
    return n * max(1, int(reader.GetNumberOfComponents())) * per_component


def read_image(path: Path | str, volume_id: str, max_bytes: int | None = None) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA image, turning any reader failure into an InputError naming both.

    The header is read first: an image whose voxels would take more than `max_bytes` (default
    `max_image_bytes()`) is refused before SimpleITK allocates anything.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"volume {volume_id}: file not found: {path}")
    cap = max_image_bytes() if max_bytes is None else max_bytes
    reader = read_header_info(path, volume_id)
    need = image_nbytes(reader)
    if cap and need > cap:
        raise InputError(f"volume {volume_id}: {path} declares {'x'.join(map(str, reader.GetSize()))} voxels "
                         f"({need / 2**20:.1f} MiB), over the cap of {cap / 2**20:.1f} MiB per image "
                         "(MEDREGION_MAX_IMAGE_GB); refused before reading")
    check_complete(path, volume_id)
    try:
        return reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"volume {volume_id}: cannot read {path}: {first}") from None


def image_array(image: sitk.Image, path: Path | str, volume_id: str, dtype: Any = None) -> np.ndarray:
    """The (z, y, x) voxel array, checked to be 3D and finite."""
    if image.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {path} is {image.GetDimension()}D, expected 3D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"volume {volume_id}: {path} has {image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel, expected a scalar image")
    try:
        array = sitk.GetArrayFromImage(image)
    except RuntimeError as exc:
        raise InputError(f"volume {volume_id}: cannot decode {path}: {exc}") from None
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"volume {volume_id}: {path} contains NaN or inf voxels")
    return array.astype(dtype, copy=False) if dtype is not None else array


def geometry(image: sitk.Image) -> dict[str, list[float]]:
    """Spacing, origin and direction as JSON-friendly lists (x, y, z order as SimpleITK)."""
    return {
        "size": list(image.GetSize()),
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def setup_logging(log_file: str | None = None) -> logging.Logger:
    """Log to stderr (Snakemake redirects it to the rule's log file) and optionally to a file."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        handlers=handlers,
        force=True,
    )
    return logging.getLogger("medregion")


# ---- fast mask reading: NIfTI headers parsed here, gzip inflated by libdeflate into reused buffers ----
#
# Reading 210 structure files of a RadGenome-size volume through SimpleITK spends most of its time in
# zlib and in allocating a fresh image per file. Masks on the CT's own grid take this path instead:
# the NIfTI-1 header is parsed here (its geometry fields compared byte for byte with the CT's), and the
# gzip stream is inflated by libdeflate (the `deflate` package) straight into a per-thread buffer that
# is reused from file to file; ctypes releases the GIL, so threads decode files in parallel. Anything
# unusual (NIfTI-2, scaled values, another grid, another format) goes through SimpleITK as before.

_NIFTI_DTYPES: dict[int, str] = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2",
                                 768: "u4", 1024: "i8", 1280: "u8"}


class NiftiHeader:
    """The parts of a NIfTI-1 header the fast path needs (sizes in x, y, z order as SimpleITK)."""

    __slots__ = ("dims", "dtype", "vox_offset", "scaled", "geometry_key")

    def __init__(self, dims: tuple[int, ...], dtype: np.dtype | None, vox_offset: int, scaled: bool,
                 geometry_key: bytes) -> None:
        self.dims = dims
        self.dtype = dtype
        self.vox_offset = vox_offset
        self.scaled = scaled
        self.geometry_key = geometry_key

    @property
    def n_voxels(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        """Header + voxel bytes of the uncompressed file."""
        itemsize = self.dtype.itemsize if self.dtype is not None else 0
        return self.vox_offset + self.n_voxels * itemsize


def parse_nifti_header(head: bytes) -> NiftiHeader | None:
    """A NIfTI-1 header from the first 348+ bytes; None for anything else (NIfTI-2, other formats)."""
    if len(head) < 348:
        return None
    for endian in ("<", ">"):
        if struct.unpack(endian + "i", head[:4])[0] == 348:
            break
    else:
        return None
    dim = struct.unpack(endian + "8h", head[40:56])
    ndim = int(dim[0])
    if not 1 <= ndim <= 7:
        return None
    dims = tuple(max(int(d), 1) for d in dim[1 : 1 + ndim])
    code = struct.unpack(endian + "h", head[70:72])[0]
    dtype = np.dtype(endian + _NIFTI_DTYPES[code]) if code in _NIFTI_DTYPES else None
    vox_offset = _float_offset(struct.unpack(endian + "f", head[108:112])[0])
    if vox_offset is None:
        return None  # not a header the fast path can use: SimpleITK decides
    slope, inter = struct.unpack(endian + "2f", head[112:120])
    scaled = not (slope in (0.0, 1.0) and inter == 0.0) or not (math.isfinite(slope) and math.isfinite(inter))
    # every field ITK derives size, spacing, origin and direction from (dim, pixdim incl. qfac, units,
    # qform / sform codes and parameters), plus the byte order they are written in
    key = head[:4] + head[40:56] + head[76:108] + head[123:124] + head[252:328]
    return NiftiHeader(dims, dtype, max(vox_offset, 352), scaled, key)


def read_nifti_header(path: Path, volume_id: str) -> NiftiHeader | None:
    """Parse the header of a .nii / .nii.gz file without reading its voxels; None if not NIfTI-1."""
    try:
        if path.name.endswith(".gz"):
            with open(path, "rb") as fh:
                head = zlib.decompressobj(31).decompress(fh.read(8192), 352)
        else:
            with open(path, "rb") as fh:
                head = fh.read(352)
    except (OSError, zlib.error) as exc:
        raise InputError(f"volume {volume_id}: {path} is not a readable gzip file ({exc})") from None
    return parse_nifti_header(head)


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


_PLAUSIBLE = 1e9  # no voxel size, direction entry or offset (mm) of a real image comes near this


def nifti_geometry_problem(head: bytes) -> str | None:
    """What makes a NIfTI-1/2 header's geometry unusable (non-finite or absurd pixdim, quaternion,
    offsets or sform rows in use), or None.

    SimpleITK must not see such a header: its NIfTI reader can loop forever on them (the polar
    decomposition of an sform with an infinite entry never converges).
    """
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            ndim = struct.unpack(endian + "h", head[40:42])[0]
            pixdim = struct.unpack(endian + "8f", head[76:108])
            qcode, scode = struct.unpack(endian + "2h", head[252:256])
            quat = struct.unpack(endian + "6f", head[256:280])
            srow = struct.unpack(endian + "12f", head[280:328])
        elif len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            ndim = struct.unpack(endian + "q", head[16:24])[0]
            pixdim = struct.unpack(endian + "8d", head[104:168])
            qcode, scode = struct.unpack(endian + "2i", head[344:352])
            quat = struct.unpack(endian + "6d", head[352:400])
            srow = struct.unpack(endian + "12d", head[400:496])
        else:
            continue
        used = {"pixdim": pixdim[: 1 + max(0, min(int(ndim), 7))]}
        if qcode > 0:
            used["quaternion / qoffset"] = quat
        if scode > 0:
            used["sform"] = srow
        for name, values in used.items():
            if not all(math.isfinite(v) and abs(v) < _PLAUSIBLE for v in values):
                return f"its NIfTI header has a non-finite or absurd {name} ({', '.join(f'{v:g}' for v in values)})"
        return None
    return None


def _nifti_head(path: Path) -> bytes:
    """The first 544 bytes of a .nii / .nii.gz (b'' when unreadable: the reader then says why)."""
    try:
        with open(path, "rb") as fh:
            if path.name.endswith(".gz"):
                return zlib.decompressobj(31).decompress(fh.read(8192), 544)
            return fh.read(544)
    except (OSError, zlib.error):
        return b""


def read_header_info(path: Path | str, volume_id: str) -> sitk.ImageFileReader:
    """SimpleITK's header of any image file (no voxels read): size, spacing, origin, direction, type."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"volume {volume_id}: file not found: {path}")
    if path.name.endswith((".nii", ".nii.gz")):
        problem = nifti_geometry_problem(_nifti_head(path))
        if problem:
            raise InputError(f"volume {volume_id}: {path}: {problem}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        if path.name.endswith(".gz"):  # ITK says only "Unable to determine ImageIO reader" for a broken stream
            verify_gzip_stream(path, volume_id)
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"volume {volume_id}: cannot read the header of {path}: {first}") from None
    return reader


def check_memory(reader: sitk.ImageFileReader, path: Path | str, volume_id: str, cap_bytes: int | None,
                 bytes_per_voxel: float) -> None:
    """Refuse, from the header alone, an image whose processing would need more than `cap_bytes`."""
    if not cap_bytes:
        return
    n = 1
    for d in reader.GetSize():
        n *= int(d)
    n *= max(1, int(reader.GetNumberOfComponents()))
    need = n * bytes_per_voxel
    if need > cap_bytes:
        raise InputError(f"volume {volume_id}: {path} has {'x'.join(map(str, reader.GetSize()))} voxels: about "
                         f"{need / 2**30:.1f} GiB to process, over the memory cap of {cap_bytes / 2**30:.1f} GiB "
                         "(config regions.memory_cap_gb); refused before reading")


def nifti_voxels(path: Path | str, volume_id: str) -> np.ndarray | None:
    """The raw voxel values of a NIfTI-1 file as stored (flat), or None for other formats.

    ITK's NIfTI reader turns NaN voxels into 0 without a word; reading the stored values here is how
    a float volume's NaN / inf voxels are found.
    """
    path = Path(path)
    if not path.name.endswith((".nii", ".nii.gz")):
        return None
    hdr = read_nifti_header(path, volume_id)
    if hdr is None or hdr.dtype is None:
        return None
    cap = max_image_bytes()
    if hdr.nbytes > cap:
        raise InputError(f"volume {volume_id}: {path} declares {'x'.join(map(str, hdr.dims))} voxels "
                         f"({hdr.nbytes / 2**20:.1f} MiB), over the cap of {cap / 2**20:.1f} MiB per image "
                         "(MEDREGION_MAX_IMAGE_GB); refused before reading")
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        raw = Inflater().inflate(data, hdr.nbytes, path, volume_id)
    else:
        if len(data) < hdr.nbytes:
            raise InputError(f"volume {volume_id}: {path} is truncated ({len(data)} of {hdr.nbytes} bytes)")
        raw = np.frombuffer(data, np.uint8, hdr.nbytes)
    return raw[hdr.vox_offset : hdr.nbytes].view(hdr.dtype)


def check_finite(path: Path | str, volume_id: str) -> bool:
    """Refuse a float NIfTI holding NaN or inf voxels (checked on the stored values, see nifti_voxels).

    The whole file is decoded (a .nii.gz by libdeflate, CRC and length checked), so a corrupt stream
    is refused too. Returns whether the stored values could be read (a NIfTI-1 of a known data type).
    """
    voxels = nifti_voxels(path, volume_id)
    if voxels is not None and voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        n = int((~np.isfinite(voxels)).sum())
        raise InputError(f"volume {volume_id}: {path} contains {n} NaN or inf voxels "
                         "(SimpleITK would silently read them as 0)")
    return voxels is not None
