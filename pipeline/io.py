"""Small I/O helpers every stage uses: atomic writes and CT/mask reading with clear errors."""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import struct
import sys
import zlib
from collections.abc import Iterator
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


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `path`, on failure remove it.

    Works for files and directories (e.g. a Zarr store), so an interrupted job never leaves an
    output that looks complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _nifti_expected_size(head: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/2 occupies uncompressed (header + extensions + voxels), if known."""
    for endian in ("<", ">"):
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
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
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"volume {volume_id}: {path} is truncated or corrupt ({exc})") from None


def read_image(path: Path | str, volume_id: str) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA image, turning any reader failure into an InputError naming both."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"volume {volume_id}: file not found: {path}")
    if path.name.endswith(".nii.gz"):
        check_gzip_complete(path, volume_id)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unreadable"
        raise InputError(f"volume {volume_id}: cannot read {path}: {first}") from None


def image_array(image: sitk.Image, path: Path | str, volume_id: str, dtype: Any = None) -> np.ndarray:
    """The (z, y, x) voxel array, checked to be 3D and finite."""
    if image.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {path} is {image.GetDimension()}D, expected 3D")
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
