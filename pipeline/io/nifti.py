"""CT and mask reading with clear errors: every reader failure is an InputError naming volume and file.

SimpleITK reads the images; before it does, the NIfTI header is checked here (geometry it could loop
on, a voxel count over the per-image cap, a truncated file that ITK would zero-fill), and float
volumes' stored values are checked for NaN / inf, which ITK reads as 0. The NIfTI-1 header parser
(`parse_nifti_header`) also serves the regions stage's fast mask path (`pipeline.io.deflate`).
"""

from __future__ import annotations

import gzip
import math
import os
import re
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from pipeline.io.deflate import Inflater
from pipeline.io.errors import InputError


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
                         "(config segmentation.memory_cap_gb); refused before reading")


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
