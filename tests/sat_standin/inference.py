"""Stand-in for SAT's `inference.py` (zhaoziheng/SAT), for testing the SAT adapter without a GPU.

Same command line, same input jsonl, same preprocessing geometry and the same output layout as SAT:
  1. reorient to RAS (SimpleITK's DICOMOrient "RAS" = MONAI Orientationd(axcodes="RAS"));
  2. resample to 1 x 1 x 3 mm, bilinear, grid from the first voxel centre with
     round((n - 1) * spacing / new_spacing + 1) voxels per axis (MONAI Spacingd);
  3. crop to the bounding box of voxels > 0 (MONAI CropForegroundd);
  4. clip to [-500, 1000] and z-score for the saved image.
Outputs `<rcd_dir>/<dataset>/seg_<sample>/<label>.nii.gz` (float32 0/1), `seg_<sample>.nii.gz`
(label j + 1, summed) and `img_<sample>.nii.gz`, all with an identity affine (NIfTI RAS), as SAT's
nibabel writes them. Instead of a network, each term is "segmented" by an HU band of the
processed image (TERM_HU below); other terms give empty masks. It deliberately shares no code with
`pipeline.sat`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TERM_HU = {  # term -> [low, high) HU band on the processed image
    "lung": (-950.0, -450.0),
    "liver": (95.0, 225.0),
    "spleen": (225.0, 650.0),
    "bone": (650.0, 3000.0),
}


def write_identity(array_zyx: np.ndarray, path: Path) -> None:
    """Write like nibabel's Nifti1Image(array_hwd, np.eye(4)): NIfTI identity affine = LPS diag(-1,-1,1)."""
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((1.0, 1.0, 1.0))
    image.SetOrigin((0.0, 0.0, 0.0))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, str(path), useCompression=True)


def preprocess(path: str) -> np.ndarray:
    image = sitk.Cast(sitk.ReadImage(path), sitk.sitkFloat32)
    oriented = sitk.DICOMOrient(image, "RAS")
    new_spacing = (1.0, 1.0, 3.0)
    size = [int(round((n - 1) * s / t + 1)) for n, s, t in zip(oriented.GetSize(), oriented.GetSpacing(), new_spacing)]
    resampled = sitk.Resample(oriented, size, sitk.Transform(), sitk.sitkLinear, oriented.GetOrigin(), new_spacing,
                              oriented.GetDirection(), -1024.0, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(resampled)  # (z, y, x) = SAT's (d, w, h) transposed
    fg = np.nonzero(arr > 0)
    lo = [int(a.min()) for a in fg]
    hi = [int(a.max()) + 1 for a in fg]
    return arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rcd_dir", required=True)
    ap.add_argument("--datasets_jsonl", required=True)
    ap.add_argument("--vision_backbone", default="UNET")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--text_encoder", default="ours")
    ap.add_argument("--text_encoder_checkpoint", default=None)
    ap.add_argument("--max_queries", type=int, default=256)
    ap.add_argument("--batchsize_3d", type=int, default=2)
    args = ap.parse_args()
    for line in Path(args.datasets_jsonl).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        datum = json.loads(line)
        sample = datum["image"].split("/")[-1].replace(".nii.gz", "")
        processed = preprocess(datum["image"])
        out = Path(args.rcd_dir) / datum["dataset"]
        (out / f"seg_{sample}").mkdir(parents=True, exist_ok=True)
        aggregate = np.zeros(processed.shape, np.float32)
        for j, label in enumerate(datum["label"]):
            lo, hi = TERM_HU.get(label.lower(), (np.inf, np.inf))
            mask = ((processed >= lo) & (processed < hi)).astype(np.float32)
            aggregate += mask * (j + 1)
            write_identity(mask, out / f"seg_{sample}" / f"{label}.nii.gz")
        write_identity(aggregate, out / f"seg_{sample}.nii.gz")
        clipped = np.clip(processed, -500, 1000)
        write_identity(((clipped - clipped.mean()) / clipped.std()).astype(np.float32), out / f"img_{sample}.nii.gz")
        print(f"{sample}: {processed.shape[::-1]} processed voxels, {len(datum['label'])} terms", flush=True)


if __name__ == "__main__":
    main()
