"""Small I/O helpers every stage uses: atomic writes and CT/mask reading with clear errors."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
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


def read_image(path: Path | str, volume_id: str) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA image, turning any reader failure into an InputError naming both."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"volume {volume_id}: file not found: {path}")
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
