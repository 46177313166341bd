"""Masks to open in a viewer: the regions stage's packed masks as NIfTI label maps on each CT's own grid,
with colour tables for 3D Slicer and ITK-SNAP.

Per volume, in `<out>/<volume_id>/`:
- `regions.nii.gz`: uint8 label map of the six regions; `lesions.nii.gz`: uint8 label map of the three
  lesion channels (nodule, cyst, effusion). Both on the CT file's own voxel grid (size, spacing, origin and
  direction of its header, the axis order it was stored in), so a viewer lays them over the CT as they
  are; the regions stage keeps its masks in one canonical orientation, and the export undoes that exactly.
- A voxel's label is the bit pattern of the channels it belongs to (regions: lung 1, airways 2,
  mediastinum 4, heart 8, osseous 16, abdomen 32; lesions: nodule 1, cyst 2, effusion 4), so overlapping
  channels stay exact: a voxel in lung and airways is label 3, named "lung+airways" in the tables. Only
  the labels present are listed.
- `regions.ctbl` / `lesions.ctbl`: 3D Slicer colour tables (`index name R G B A`; load the table, then the
  label map with it); `regions_itksnap.txt` / `lesions_itksnap.txt`: ITK-SNAP label description files
  (Segmentation > Import Label Descriptions); `labels.json`: the label -> channels table and voxel counts.
Colours from `pipeline.label_colours` (visible on air, lung, soft tissue and bone); a combination gets
the mean of its members' colours.

CLI: `python -m pipeline.export_masks --masks results/masks/shard-0.zarr --manifest results/cohort.parquet
--out results/export/masks/shard-0` (the workflow's `export_masks` target runs it for every shard).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from pipeline.constants import LESIONS, REGIONS
from pipeline.io import InputError, atomic_output, setup_logging
from pipeline.label_colours import LESION_COLOURS, REGION_COLOURS, rgb
from pipeline.orientation import Reorientation, reorientation
from pipeline.regions import open_masks, read_labels

GROUPS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "regions": (REGIONS, REGION_COLOURS),
    "lesions": (LESIONS, LESION_COLOURS),
}


def channel_code(labels: np.ndarray, channels: Sequence[str], table: Sequence[str]) -> np.ndarray:
    """uint8 (z, y, x): bit j set where the voxel's packed word has the bit of `channels[j]` (bit i of the
    word = `table[i]`, the store's channel list)."""
    code = np.zeros(labels.shape, np.uint8)
    for j, name in enumerate(channels):
        if name in table:
            code |= (((labels >> np.uint32(table.index(name))) & np.uint32(1)).astype(np.uint8) << j)
    return code


def label_name(value: int, channels: Sequence[str]) -> str:
    return "+".join(c for j, c in enumerate(channels) if value >> j & 1)


def label_colour(value: int, channels: Sequence[str], colours: dict[str, str]) -> tuple[int, int, int]:
    members = [rgb(colours[c]) for j, c in enumerate(channels) if value >> j & 1]
    return tuple(int(round(sum(m[k] for m in members) / len(members))) for k in range(3))  # type: ignore[return-value]


def slicer_table(values: Sequence[int], channels: Sequence[str], colours: dict[str, str]) -> str:
    lines = ["# 3D Slicer colour table (MedRegion-CT label map; label = bit pattern of the channels)",
             "0 background 0 0 0 0"]
    for v in values:
        r, g, b = label_colour(v, channels, colours)
        lines.append(f"{v} {label_name(v, channels)} {r} {g} {b} 255")
    return "\n".join(lines) + "\n"


def itksnap_table(values: Sequence[int], channels: Sequence[str], colours: dict[str, str]) -> str:
    lines = ["################################################", "# ITK-SnAP Label Description File",
             "# IDX   -R-  -G-  -B-  -A--  VIS MSH  LABEL", "################################################",
             '    0     0    0    0        0  0  0    "Clear Label"']
    for v in values:
        r, g, b = label_colour(v, channels, colours)
        lines.append(f'{v:5d} {r:5d} {g:4d} {b:4d}        1  1  1    "{label_name(v, channels)}"')
    return "\n".join(lines) + "\n"


def to_source(canonical: np.ndarray, r: Reorientation, source_shape: Sequence[int]) -> np.ndarray:
    """Undo `r.array`: the (z, y, x) array in the source's axis order and directions (exact, a view)."""
    perm = [2 - r.axes[2 - k] for k in range(3)]
    flips = tuple(slice(None, None, -1) if r.flip[2 - k] else slice(None) for k in range(3))
    out = np.transpose(canonical[flips], np.argsort(perm))
    if tuple(out.shape) != tuple(source_shape):
        raise ValueError(f"reoriented shape {out.shape} is not the CT's {tuple(source_shape)}")
    return out


def _check_inverse(r: Reorientation) -> None:
    """`to_source` must invert `Reorientation.array` exactly (checked on a small array with distinct sizes)."""
    probe = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    if not np.array_equal(to_source(r.array(probe), r, probe.shape), probe):
        raise AssertionError(f"to_source does not invert {r}")


def _geometry(image_or_reader) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    return (tuple(image_or_reader.GetSize()), tuple(image_or_reader.GetSpacing()), tuple(image_or_reader.GetOrigin()),
            tuple(image_or_reader.GetDirection()))


def export_volume(volume_id: str, labels: np.ndarray, attrs: dict, table: Sequence[str], ct_path: Path,
                  out_dir: Path) -> dict[str, object]:
    """Write one volume's label maps, colour tables and labels.json into `out_dir` (atomically)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct_path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise InputError(f"volume {volume_id}: cannot read the CT header of {ct_path}: {exc}") from None
    ct_size, ct_spacing, ct_origin, ct_direction = _geometry(reader)
    r_ct = reorientation(ct_direction)
    r_masks = reorientation(attrs["direction"])
    masks_size = tuple(int(s) for s in reversed(labels.shape))
    canon_ct = r_ct.grid(ct_size, ct_spacing, ct_origin, ct_direction)
    canon_masks = r_masks.grid(masks_size, attrs["spacing"], attrs["origin"], attrs["direction"])
    if canon_ct[0] != canon_masks[0] or not np.allclose(canon_ct[1], canon_masks[1], rtol=1e-4) or not np.allclose(
            canon_ct[2], canon_masks[2], atol=1e-3 * max(canon_ct[1])):
        raise InputError(f"volume {volume_id}: the masks' grid ({masks_size}, origin {attrs['origin']}) is not the grid "
                         f"of {ct_path} ({ct_size}, origin {ct_origin}): the CT changed after the regions stage ran")
    _check_inverse(r_ct)
    canonical = r_masks.array(labels)
    on_ct = to_source(canonical, r_ct, tuple(reversed(ct_size)))
    summary: dict[str, object] = {"volume_id": volume_id, "ct_path": str(ct_path), "label_maps": {}}
    with atomic_output(out_dir) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        for group, (channels, colours) in GROUPS.items():
            code = channel_code(on_ct, channels, table)
            values, counts = np.unique(code, return_counts=True)
            present = [int(v) for v in values if v]
            image = sitk.GetImageFromArray(np.ascontiguousarray(code))
            image.SetSpacing(ct_spacing)
            image.SetOrigin(ct_origin)
            image.SetDirection(ct_direction)
            sitk.WriteImage(image, str(tmp / f"{group}.nii.gz"), useCompression=True)
            (tmp / f"{group}.ctbl").write_text(slicer_table(present, channels, colours), encoding="utf-8")
            (tmp / f"{group}_itksnap.txt").write_text(itksnap_table(present, channels, colours), encoding="utf-8")
            summary["label_maps"][group] = {  # type: ignore[index]
                "bits": {c: 1 << j for j, c in enumerate(channels)},
                "labels": {str(v): {"name": label_name(v, channels), "voxels": int(n)}
                           for v, n in zip(values, counts) if v},
            }
        (tmp / "labels.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def export_shard(masks_zarr: Path, manifest: pd.DataFrame, out: Path) -> list[str]:
    """Every volume of a masks store; returns the exported volume ids."""
    log = setup_logging()
    group = open_masks(masks_zarr)
    table = list(group.attrs["channels"])
    ct_of = dict(zip(manifest["volume_id"].astype(str), manifest["ct_path"].astype(str)))
    out.mkdir(parents=True, exist_ok=True)
    done: list[str] = []
    for vid in group.attrs["volume_ids"]:
        if vid not in ct_of:
            raise InputError(f"volume {vid} of {masks_zarr} is not in the cohort manifest")
        arr = group[vid]
        labels = read_labels(arr, masks_zarr / vid)
        export_volume(vid, labels, dict(arr.attrs), table, Path(ct_of[vid]), out / vid)
        done.append(vid)
        log.info("%s: label maps written to %s", vid, out / vid)
    log.info("%d volumes exported from %s", len(done), masks_zarr)
    return done


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.export_masks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", type=Path, required=True, help="a masks store of the regions stage (shard-<k>.zarr)")
    ap.add_argument("--manifest", type=Path, required=True, help="results/cohort.parquet (the CT path of each volume)")
    ap.add_argument("--out", type=Path, required=True, help="folder that gets one sub-folder per volume")
    args = ap.parse_args(argv)
    export_shard(args.masks, pd.read_parquet(args.manifest), args.out)


if __name__ == "__main__":
    main()
