"""SAT backend: run SAT (zhaoziheng/SAT) on a shard and map its output back onto each input CT's grid.

SAT's `inference.py` (run from a user's checkout, in its own environment `envs/sat.yaml`, launched
with `torchrun --nproc_per_node=1`) reads a jsonl of `{"image", "label": [terms], "modality": "ct",
"dataset"}` lines and writes, per image, `<rcd_dir>/<dataset>/seg_<sample>/<term>.nii.gz` (binary,
one per term), `seg_<sample>.nii.gz` and `img_<sample>.nii.gz`, where `<sample>` is the image's
file name without `.nii.gz`. All of them are in SAT's *processed* space with an identity affine:
1. reoriented to RAS (MONAI `Orientationd(axcodes="RAS")`),
2. resampled to 1 x 1 x 3 mm (`Spacingd`, bilinear; the grid starts at the first voxel centre and
   has round((n - 1) * spacing / new_spacing + 1) voxels per axis),
3. cropped to the bounding box of voxels > 0 (`CropForegroundd`, default select function),
4. intensities clipped to [-500, 1000] and z-scored (the saved `img_<sample>`).

`map_back` inverts the geometry: it rebuilds steps 1-2 from the CT's header (so no geometry from
SAT's files is trusted), finds the crop offset by redoing step 3 and confirming it against SAT's
own `img_<sample>` (correlation over the crop; a small search around it if MONAI's interpolation
moved the box by a voxel), then resamples each term's mask (linear, threshold 0.5) onto the CT's
grid and writes it in SAT's layout, `<out>/seg_<volume>/<term>.nii.gz`, uint8, CT geometry.

What runs here: the adapter is tested against `tests/sat_standin/inference.py`, a stand-in that
reproduces SAT's command line, preprocessing and output layout (it segments by HU thresholds instead
of a network). SAT itself (GPU, checkpoints) is not run by the tests.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from pipeline.io import InputError, atomic_output, image_array, read_image

SAT_SPACING = (1.0, 1.0, 3.0)
SAT_CLIP = (-500.0, 1000.0)
SAT_DATASET = "medregion"
MIN_CORRELATION = 0.95
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def sample_id(ct_path: Path | str) -> str:
    """SAT names its outputs after the image file: `<name>.nii.gz` -> `<name>`."""
    name = Path(ct_path).name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem


def write_jsonl(ct_paths: Sequence[Path | str], terms: Sequence[str], out: Path | str,
                dataset: str = SAT_DATASET) -> None:
    """SAT's input list: one line per CT with every term to segment."""
    samples = [sample_id(p) for p in ct_paths]
    dup = {s for s in samples if samples.count(s) > 1}
    if dup:
        raise InputError(f"SAT names outputs by file name: CT files share names {sorted(dup)[:3]}")
    lines = [json.dumps({"image": str(Path(p).resolve()), "label": list(terms), "modality": "ct",
                         "dataset": dataset}) for p in ct_paths]
    with atomic_output(Path(out)) as tmp:
        tmp.write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")


def inference_command(checkout: Path | str, jsonl: Path | str, out_dir: Path | str, *, checkpoint: str,
                      text_encoder_checkpoint: str, vision_backbone: str = "UNET-L", text_encoder: str = "ours",
                      max_queries: int = 256, batchsize_3d: int = 2,
                      launcher: str = "torchrun --nproc_per_node=1") -> list[str]:
    """SAT's documented command line (run it with cwd = the checkout)."""
    return [*shlex.split(launcher), str(Path(checkout) / "inference.py"),
            "--rcd_dir", str(out_dir), "--datasets_jsonl", str(jsonl),
            "--vision_backbone", vision_backbone, "--checkpoint", str(checkpoint),
            "--text_encoder", text_encoder, "--text_encoder_checkpoint", str(text_encoder_checkpoint),
            "--max_queries", str(max_queries), "--batchsize_3d", str(batchsize_3d)]


def run_inference(cmd: Sequence[str], checkout: Path | str, log: Path | None = None) -> None:
    """Run SAT; a failure raises with the tail of its output."""
    env = {**os.environ, "PYTHONPATH": str(checkout) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(list(cmd), cwd=str(checkout), capture_output=True, encoding="utf-8", errors="replace", env=env)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n" + proc.stderr, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"SAT failed ({proc.returncode}): {' '.join(cmd)}\n{(proc.stdout + proc.stderr)[-3000:]}")


# ---- SAT's processed space, rebuilt from the CT header ------------------------------------------------


@dataclass
class Grid:
    """A voxel grid in SimpleITK terms (LPS): size / spacing / origin / direction, x y z order."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    def matrix(self) -> np.ndarray:
        return np.asarray(self.direction, float).reshape(3, 3)

    def point(self, index: Sequence[float]) -> np.ndarray:
        return np.asarray(self.origin) + self.matrix() @ (np.asarray(index, float) * np.asarray(self.spacing))

    def sub(self, start: Sequence[int], size: Sequence[int]) -> Grid:
        return Grid(tuple(int(s) for s in size), self.spacing, tuple(float(v) for v in self.point(start)),
                    self.direction)

    def continuous_index(self, points: np.ndarray) -> np.ndarray:
        """(n, 3) physical points -> (n, 3) continuous indices."""
        inv = np.linalg.inv(self.matrix() * np.asarray(self.spacing))
        return (np.asarray(points, float) - np.asarray(self.origin)) @ inv.T


def grid_of(image: sitk.Image | sitk.ImageFileReader) -> Grid:
    return Grid(tuple(int(s) for s in image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                tuple(image.GetDirection()))


def ras_oriented(grid: Grid) -> Grid:
    """The grid after MONAI's Orientationd(axcodes="RAS"): axes permuted / flipped to point R, A, S."""
    d_ras = _LPS_TO_RAS @ grid.matrix()  # columns: array axes in RAS world coordinates
    order = np.argsort(-np.abs(d_ras).max(axis=0))  # assign the most decided axes first
    world_of: dict[int, int] = {}
    for axis in order:
        for w in np.argsort(-np.abs(d_ras[:, axis])):
            if int(w) not in world_of.values():
                world_of[int(axis)] = int(w)
                break
    size, spacing, cols = [0, 0, 0], [0.0, 0.0, 0.0], [None, None, None]
    origin = np.asarray(grid.origin, float)
    for axis, w in world_of.items():
        sign = 1.0 if d_ras[w, axis] >= 0 else -1.0
        if sign < 0:  # flipped: the new first voxel is the old last one
            origin = origin + (grid.size[axis] - 1) * grid.spacing[axis] * grid.matrix()[:, axis]
        size[w], spacing[w] = grid.size[axis], grid.spacing[axis]
        cols[w] = sign * grid.matrix()[:, axis]
    direction = np.column_stack(cols)
    return Grid(tuple(size), tuple(spacing), tuple(float(v) for v in origin), tuple(direction.ravel()))


def processed_grid(ct: Grid) -> Grid:
    """SAT's full processed grid (before the foreground crop): RAS, 1 x 1 x 3 mm, first voxel kept."""
    oriented = ras_oriented(ct)
    size = tuple(int(round((n - 1) * s / t + 1)) for n, s, t in zip(oriented.size, oriented.spacing, SAT_SPACING))
    return Grid(size, SAT_SPACING, oriented.origin, oriented.direction)


def resample(image: sitk.Image, grid: Grid, interpolator: int = sitk.sitkLinear, default: float = 0.0) -> sitk.Image:
    return sitk.Resample(image, list(grid.size), sitk.Transform(), interpolator, grid.origin, grid.spacing,
                         grid.direction, default, image.GetPixelID())


def _zscore(a: np.ndarray) -> np.ndarray:
    a = np.clip(a.astype(np.float32), *SAT_CLIP)
    sd = float(a.std())
    return (a - float(a.mean())) / (sd if sd > 0 else 1.0)


def locate_crop(ct_image: sitk.Image, full: Grid, crop_size: Sequence[int] | None,
                sat_image: np.ndarray | None, volume_id: str, search: int = 2) -> tuple[tuple[int, int, int], float]:
    """The crop's start index (x, y, z) in the full processed grid, and the check's correlation."""
    processed = image_array(resample(sitk.Cast(ct_image, sitk.sitkFloat32), full, default=-1024.0),
                            "processed CT", volume_id)  # (z, y, x)
    fg = processed > 0
    if not fg.any():
        raise InputError(f"volume {volume_id}: the CT has no voxel above 0 HU: SAT's foreground crop is undefined")
    lo = [int(np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
    hi = [int(np.flatnonzero(fg.any(axis=tuple(a for a in range(3) if a != ax)))[-1]) + 1 for ax in range(3)]
    start_zyx = lo
    size_zyx = [h - low for low, h in zip(lo, hi)] if crop_size is None else list(crop_size)[::-1]
    if sat_image is None:
        return (start_zyx[2], start_zyx[1], start_zyx[0]), float("nan")
    if tuple(sat_image.shape) != tuple(size_zyx):
        raise InputError(f"volume {volume_id}: SAT's processed image has shape {sat_image.shape}, its masks {size_zyx}")
    ref = sat_image[::2, ::2, ::2].astype(np.float32).ravel()
    ref = (ref - ref.mean()) / (ref.std() or 1.0)

    def corr(start: Sequence[int]) -> float:
        if any(s < 0 or s + n > m for s, n, m in zip(start, size_zyx, processed.shape)):
            return -1.0
        box = processed[start[0]:start[0] + size_zyx[0], start[1]:start[1] + size_zyx[1], start[2]:start[2] + size_zyx[2]]
        ours = _zscore(box)[::2, ::2, ::2].ravel()
        ours = (ours - ours.mean()) / (ours.std() or 1.0)
        return float(ours @ ref / ref.size)

    best, best_c = list(start_zyx), corr(start_zyx)
    if best_c < 0.99:
        offsets = range(-search, search + 1)
        for dz in offsets:
            for dy in offsets:
                for dx in offsets:
                    cand = [start_zyx[0] + dz, start_zyx[1] + dy, start_zyx[2] + dx]
                    c = corr(cand)
                    if c > best_c:
                        best, best_c = cand, c
    if best_c < MIN_CORRELATION:
        raise InputError(f"volume {volume_id}: SAT's processed image does not line up with the CT (best correlation "
                         f"{best_c:.3f} < {MIN_CORRELATION}): was SAT run on this file?")
    return (best[2], best[1], best[0]), best_c


def _mask_to_ct(mask_zyx: np.ndarray, crop: Grid, ct: Grid) -> np.ndarray | None:
    """A processed-space mask -> uint8 (z, y, x) on the CT grid (linear + 0.5), or None if empty."""
    nz = np.nonzero(mask_zyx > 0)
    if not nz[0].size:
        return None
    lo = np.array([nz[2].min(), nz[1].min(), nz[0].min()], float) - 1.0
    hi = np.array([nz[2].max(), nz[1].max(), nz[0].max()], float) + 1.0
    corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)])).T.reshape(-1, 3)
    pts = np.array([crop.point(c) for c in corners])
    idx = ct.continuous_index(pts)
    start = np.clip(np.floor(idx.min(0)).astype(int) - 1, 0, np.array(ct.size))
    stop = np.clip(np.ceil(idx.max(0)).astype(int) + 2, 0, np.array(ct.size))
    if np.any(stop <= start):
        return np.zeros(ct.size[::-1], np.uint8)
    image = sitk.GetImageFromArray(mask_zyx.astype(np.float32))
    image.SetSpacing(crop.spacing)
    image.SetOrigin(crop.origin)
    image.SetDirection(crop.direction)
    sub = ct.sub(start, stop - start)
    part = sitk.GetArrayFromImage(resample(image, sub)) >= 0.5
    out = np.zeros(ct.size[::-1], np.uint8)
    out[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]] = part
    return out


def map_back(volume_id: str, ct_path: Path | str, sat_dir: Path | str, out_dir: Path | str,
             terms: Sequence[str] | None = None) -> dict[str, object]:
    """SAT's outputs for one CT (`sat_dir` = `<rcd_dir>/<dataset>`) -> masks on the CT grid.

    Writes `<out_dir>/seg_<volume_id>/<term>.nii.gz` atomically; returns a summary for the QC table.
    """
    ct_path, sat_dir, out_dir = Path(ct_path), Path(sat_dir), Path(out_dir)
    sample = sample_id(ct_path)
    case = sat_dir / f"seg_{sample}"
    if not case.is_dir():
        raise InputError(f"volume {volume_id}: SAT wrote no {case}")
    files = sorted(p for p in case.iterdir() if p.name.endswith(".nii.gz"))
    if terms is not None:
        names = {p.name[: -len(".nii.gz")] for p in files}
        missing = [t for t in terms if t not in names]
        if missing:
            raise InputError(f"volume {volume_id}: SAT output {case} lacks terms {missing[:5]}")
    if not files:
        raise InputError(f"volume {volume_id}: no masks in SAT output {case}")
    ct_image = read_image(ct_path, volume_id)
    if ct_image.GetDimension() != 3:
        raise InputError(f"volume {volume_id}: {ct_path} is {ct_image.GetDimension()}D, expected 3D")
    ct = grid_of(ct_image)
    full = processed_grid(ct)
    first = read_image(files[0], volume_id)
    crop_size = tuple(int(s) for s in first.GetSize())
    img_path = sat_dir / f"img_{sample}.nii.gz"
    sat_img = image_array(read_image(img_path, volume_id), img_path, volume_id) if img_path.is_file() else None
    start, correlation = locate_crop(ct_image, full, crop_size, sat_img, volume_id)
    crop = full.sub(start, crop_size)
    non_empty = 0
    with atomic_output(out_dir / f"seg_{volume_id}") as tmp:
        tmp.mkdir(parents=True)
        for path in files:
            mask = read_image(path, volume_id)
            if tuple(mask.GetSize()) != crop_size:
                raise InputError(f"volume {volume_id}: SAT mask {path} has size {mask.GetSize()}, expected {crop_size}")
            arr = image_array(mask, path, volume_id)
            on_ct = _mask_to_ct(arr, crop, ct)
            if on_ct is None:
                on_ct = np.zeros(ct.size[::-1], np.uint8)
            else:
                non_empty += 1
            out = sitk.GetImageFromArray(on_ct)
            out.SetSpacing(ct.spacing)
            out.SetOrigin(ct.origin)
            out.SetDirection(ct.direction)
            sitk.WriteImage(out, str(tmp / path.name), useCompression=True)
    return {"volume_id": volume_id, "n_structures": len(files), "n_non_empty": non_empty,
            "crop_start_xyz": list(start), "crop_size_xyz": list(crop_size),
            "processed_size_xyz": list(full.size), "correlation": correlation}
