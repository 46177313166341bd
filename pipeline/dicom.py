"""DICOM series folder -> one NIfTI volume (dataset adapter for data that is not shipped as NIfTI).

`convert_series(folder, out_path, volume_id)`:
- reads every file's header (GDCM through SimpleITK) and keeps one series (SeriesInstanceUID; several
  series in one folder is an error unless `series_uid` picks one); non-image files are ignored;
- sorts the slices by position along the slice normal (ImagePositionPatient projected on the cross
  product of ImageOrientationPatient's row and column directions), not by file name or
  InstanceNumber; rejects duplicate positions, uneven slice gaps, mixed orientations or sizes;
- applies each slice's RescaleSlope / RescaleIntercept (HU for CT), once (GDCM does it while decoding);
- keeps the orientation: direction cosines and origin come from the DICOM geometry (LPS), so the
  NIfTI header places every voxel where the scanner did;
- copies no DICOM tag into the output: the NIfTI is built from the voxel array and the geometry
  alone, so no patient name, id, birth date, accession number or UID can leak into it.

CLI: `python -m pipeline.dicom --series DIR --out OUT.nii.gz [--volume-id ID] [--series-uid UID]`
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io import InputError, atomic_output

TAG_SERIES = "0020|000e"
TAG_POSITION = "0020|0032"
TAG_ORIENTATION = "0020|0037"
TAG_SLOPE = "0028|1053"
TAG_INTERCEPT = "0028|1052"
TAG_ROWS, TAG_COLS = "0028|0010", "0028|0011"
TAG_SPACING = "0028|0030"
# Tags that identify a patient: never written anywhere (listed for the tests and for reviewers).
IDENTIFYING_TAGS = ("0010|0010", "0010|0020", "0010|0030", "0010|1000", "0010|1001", "0008|0050",
                    "0008|0080", "0008|0090", "0020|000d", "0020|000e", "0008|0018")


@dataclass
class Slice:
    path: Path
    position: np.ndarray  # LPS mm
    orientation: np.ndarray  # 6 direction cosines
    slope: float
    intercept: float
    thickness: float | None
    rows: int
    cols: int
    spacing: tuple[float, float]  # row spacing, column spacing (mm)
    series: str


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.strip().replace(" ", "").split("\\") if v != ""]


def _read_slice(path: Path, volume_id: str) -> Slice | None:
    reader = sitk.ImageFileReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None  # not a DICOM image (DICOMDIR, a text file...)
    keys = set(reader.GetMetaDataKeys())
    if not {TAG_POSITION, TAG_ORIENTATION} <= keys:
        return None

    def meta(tag: str, default: str = "") -> str:
        return reader.GetMetaData(tag) if tag in keys else default

    try:
        position = np.array(_floats(meta(TAG_POSITION)), float)
        orientation = np.array(_floats(meta(TAG_ORIENTATION)), float)
        spacing = _floats(meta(TAG_SPACING, "1\\1"))
        slope = float(meta(TAG_SLOPE, "1") or 1)
        intercept = float(meta(TAG_INTERCEPT, "0") or 0)
        thickness = float(meta("0018|0050")) if meta("0018|0050").strip() else None
    except ValueError as exc:
        raise InputError(f"volume {volume_id}: DICOM file {path} has an unreadable geometry tag ({exc})") from None
    if position.size != 3 or orientation.size != 6:
        raise InputError(f"volume {volume_id}: DICOM file {path} has a malformed position or orientation")
    size = reader.GetSize()
    return Slice(path, position, orientation, slope, intercept, thickness, int(size[1]), int(size[0]),
                 (spacing[0], spacing[1]) if len(spacing) >= 2 else (1.0, 1.0), meta(TAG_SERIES).strip())


def sorted_series(folder: Path, volume_id: str, series_uid: str | None = None) -> list[Slice]:
    """The slices of one series, sorted by position along the slice normal, checked for consistency."""
    if not folder.is_dir():
        raise InputError(f"volume {volume_id}: DICOM folder not found: {folder}")
    slices = [s for p in sorted(folder.iterdir()) if p.is_file() and (s := _read_slice(p, volume_id))]
    if not slices:
        raise InputError(f"volume {volume_id}: no DICOM image slices in {folder}")
    series = sorted({s.series for s in slices})
    if series_uid is not None:
        slices = [s for s in slices if s.series == series_uid]
        if not slices:
            raise InputError(f"volume {volume_id}: series {series_uid} not found in {folder}")
    elif len(series) > 1:
        raise InputError(f"volume {volume_id}: {folder} holds {len(series)} series; pick one with series_uid (in an "
                         f"own-data table, the dicom_series_uid column): {', '.join(series)}")
    first = slices[0]
    for s in slices[1:]:
        if not np.allclose(s.orientation, first.orientation, atol=1e-4):
            raise InputError(f"volume {volume_id}: {s.path} has another orientation than {first.path}")
        if (s.rows, s.cols) != (first.rows, first.cols) or not np.allclose(s.spacing, first.spacing, atol=1e-4):
            raise InputError(f"volume {volume_id}: {s.path} has another size or pixel spacing than {first.path}")
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    slices.sort(key=lambda s: float(s.position @ normal))
    if len(slices) > 1:
        steps = np.diff([float(s.position @ normal) for s in slices])
        if np.any(steps < 1e-3):
            k = int(np.argmin(steps))
            raise InputError(f"volume {volume_id}: {slices[k].path} and {slices[k + 1].path} share a slice position")
        if np.ptp(steps) > max(0.01 * float(np.median(steps)), 1e-3):
            raise InputError(f"volume {volume_id}: uneven slice spacing in {folder} ({steps.min():.3f}.."
                             f"{steps.max():.3f} mm): a missing slice?")
    return slices


def read_series(folder: Path, volume_id: str, series_uid: str | None = None,
                slices: list[Slice] | None = None) -> sitk.Image:
    """The series as a 3D image with rescale applied and its DICOM geometry; no metadata attached.

    The z spacing is the distance between slice positions (not SliceThickness, which overlapping
    reconstructions exceed).
    """
    slices = slices or sorted_series(Path(folder), volume_id, series_uid)
    planes = []
    for s in slices:
        reader = sitk.ImageFileReader()
        reader.SetImageIO("GDCMImageIO")
        reader.SetFileName(str(s.path))
        try:
            raw = reader.Execute()
        except RuntimeError as exc:
            raise InputError(f"volume {volume_id}: cannot decode DICOM file {s.path}: {exc}") from None
        # GDCMImageIO applies RescaleSlope / RescaleIntercept while decoding (and widens the pixel
        # type when needed): the values are HU here, and are not rescaled a second time.
        arr = sitk.GetArrayFromImage(raw).astype(np.float64)
        planes.append(arr[0] if arr.ndim == 3 else arr)
    volume = np.stack(planes)
    if np.all(volume == np.round(volume)) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    else:
        volume = volume.astype(np.float32)
    if volume.dtype.kind == "f" and not np.isfinite(volume).all():
        raise InputError(f"volume {volume_id}: DICOM series {folder} decodes to NaN or inf voxels")
    first = slices[0]
    row, col = first.orientation[:3], first.orientation[3:]
    normal = np.cross(row, col)
    dz = float(np.median(np.diff([float(s.position @ normal) for s in slices]))) if len(slices) > 1 else 1.0
    image = sitk.GetImageFromArray(volume)
    # DICOM PixelSpacing is (row spacing = between rows, i.e. along the column direction, column spacing)
    image.SetSpacing((first.spacing[1], first.spacing[0], dz))
    image.SetOrigin(tuple(float(v) for v in first.position))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    return image


def convert_series(folder: Path | str, out_path: Path | str, volume_id: str,
                   series_uid: str | None = None) -> dict[str, object]:
    """Write the series as `out_path` (.nii.gz) atomically; returns its geometry (no identifying data)."""
    slices = sorted_series(Path(folder), volume_id, series_uid)
    image = read_series(Path(folder), volume_id, series_uid, slices)
    out_path = Path(out_path)
    with atomic_output(out_path) as tmp:
        tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
        sitk.WriteImage(image, str(tmp_nii), useCompression=True)
        tmp_nii.rename(tmp)
    arr = sitk.GetArrayViewFromImage(image)
    return {"volume_id": volume_id, "path": str(out_path), "size": list(image.GetSize()),
            "spacing": list(image.GetSpacing()), "origin": list(image.GetOrigin()),
            "direction": list(image.GetDirection()), "n_slices": len(slices),
            "slice_thickness": slices[0].thickness, "min": float(arr.min()), "max": float(arr.max())}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.dicom", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=Path, required=True, help="folder with the DICOM files of one series")
    ap.add_argument("--out", type=Path, required=True, help="output .nii.gz")
    ap.add_argument("--volume-id", default=None, help="id used in messages (default: the output's name)")
    ap.add_argument("--series-uid", default=None,
                    help="SeriesInstanceUID of the series to convert, when the folder holds several")
    args = ap.parse_args(argv)
    vid = args.volume_id or args.out.name.removesuffix(".gz").removesuffix(".nii")
    print(json.dumps(convert_series(args.series, args.out, vid, args.series_uid)))


if __name__ == "__main__":
    main()
