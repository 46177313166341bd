"""Patient-specific attributes (paper Sec. 3.4, Fig. 4 and 5) from the compact mask arrays.

Organ volumes in ml = voxel count x voxel volume (mm^3) / 1000. Lesions (nodule, cyst, effusion):
count = connected components (26-connectivity); diameter = the largest bounding-box extent of each
component in mm; location = the lobe / kidney / side with the largest overlap after a small dilation
(lesions such as effusions sit next to, not inside, the organ masks).

Output `results/attributes/shard-<k>.parquet`: `volume_id`, one `<structure>_ml` column per attribute
structure, `<lesion>_count`, `<lesion>_diameters_mm` (list), `<lesion>_locations` (list) and `prompt`,
the rendered text block of Fig. 5.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import zarr
from scipy import ndimage
from skimage.measure import label as connected_components

from pipeline.constants import ATTRIBUTE_STRUCTURES, HEART_CHAMBERS, LESIONS, LOBES
from pipeline.io import setup_logging, write_parquet
from pipeline.regions import unpack_channel

# Where a lesion of each kind is located: candidate structures (channel -> words in the prompt).
LOCATION_CANDIDATES: dict[str, dict[str, str]] = {
    "nodule": {
        "right_upper_lobe": "right upper lobe",
        "right_middle_lobe": "right middle lobe",
        "right_lower_lobe": "right lower lobe",
        "left_upper_lobe": "left upper lobe",
        "left_lower_lobe": "left lower lobe",
    },
    "cyst": {"left_kidney": "left kidney", "right_kidney": "right kidney", "liver": "liver"},
    "effusion": {"right": "right", "left": "left"},
}
_SIDES = {"right": ("right_upper_lobe", "right_middle_lobe", "right_lower_lobe"),
          "left": ("left_upper_lobe", "left_lower_lobe")}
PROMPT_NAMES: dict[str, str] = {
    "right_upper_lobe": "Right Upper Lobe",
    "right_middle_lobe": "Right Middle Lobe",
    "right_lower_lobe": "Right Lower Lobe",
    "left_upper_lobe": "Left Upper Lobe",
    "left_lower_lobe": "Left Lower Lobe",
    "left_atrium": "Left Atrium",
    "right_atrium": "Right Atrium",
    "left_ventricle": "Left Ventricle",
    "right_ventricle": "Right Ventricle",
}


def volume_attributes(labels: np.ndarray, spacing_xyz: Sequence[float]) -> dict[str, object]:
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    attrs: dict[str, object] = {}
    channel = {name: unpack_channel(labels, name) for name in (*ATTRIBUTE_STRUCTURES, *LESIONS)}
    for name in ATTRIBUTE_STRUCTURES:
        attrs[f"{name}_ml"] = round(float(channel[name].sum()) * voxel_ml, 1)
    for lesion in LESIONS:
        labelled = connected_components(channel[lesion], connectivity=3)
        diameters, locations = [], []
        for idx, sl in enumerate(ndimage.find_objects(labelled), 1):
            if sl is None:
                continue
            comp = labelled[sl] == idx
            extent = np.array([s.stop - s.start for s in sl]) * spacing_zyx
            diameters.append(round(float(extent.max()), 1))
            locations.append(_locate(lesion, comp, sl, channel))
        attrs[f"{lesion}_count"] = len(diameters)
        attrs[f"{lesion}_diameters_mm"] = diameters
        attrs[f"{lesion}_locations"] = locations
    return attrs


def _locate(lesion: str, comp: np.ndarray, sl: tuple[slice, ...], channel: dict[str, np.ndarray]) -> str:
    # Grow the component's box by a margin so an adjacent organ (pleura next to lung) is counted.
    pad = 3
    big = tuple(slice(max(s.start - pad, 0), s.stop + pad) for s in sl)
    grown = np.zeros(channel[lesion][big].shape, dtype=bool)
    inner = tuple(slice(s.start - b.start, s.start - b.start + (s.stop - s.start)) for s, b in zip(sl, big))
    grown[inner] = comp
    grown = ndimage.binary_dilation(grown, iterations=pad)
    if lesion == "effusion":
        scores = {side: sum(int((channel[c][big] & grown).sum()) for c in chans) for side, chans in _SIDES.items()}
        names = {"right": "right", "left": "left"}
    else:
        scores = {c: int((channel[c][big] & grown).sum()) for c in LOCATION_CANDIDATES[lesion]}
        names = LOCATION_CANDIDATES[lesion]
    best = max(scores, key=lambda k: scores[k])
    return names[best] if scores[best] > 0 else "undetermined"


def _fmt_list(values: Sequence[object]) -> str:
    return ", ".join(str(v) for v in values) if len(values) else "none"


def render_prompt(attrs: dict[str, object]) -> str:
    """The attribute block of the paper's Fig. 5 (organ volumes, then lesion details)."""
    lines = ["Organ Volumes:", "Lung:"]
    lines += [f"- {PROMPT_NAMES[n]}: {attrs[f'{n}_ml']} ml" for n in LOBES]
    lines.append("Heart:")
    lines += [f"- {PROMPT_NAMES[n]}: {attrs[f'{n}_ml']} ml" for n in HEART_CHAMBERS]
    lines.append(f"Liver: {attrs['liver_ml']} ml")
    lines += ["Kidney:", f"- Left: {attrs['left_kidney_ml']} ml", f"- Right: {attrs['right_kidney_ml']} ml"]
    lines.append("Lesion Details:")
    for lesion in LESIONS:
        lines += [
            f"{lesion.capitalize()}:",
            f"- count: {attrs[f'{lesion}_count']}",
            f"- diameter (mm): {_fmt_list(attrs[f'{lesion}_diameters_mm'])}",  # type: ignore[arg-type]
            f"- location: {_fmt_list(attrs[f'{lesion}_locations'])}",  # type: ignore[arg-type]
        ]
    return "\n".join(lines)


def run_shard(masks_zarr: Path, out: Path) -> pd.DataFrame:
    log = setup_logging()
    group = zarr.open_group(str(masks_zarr), mode="r")
    rows = []
    ids = list(group.attrs["volume_ids"])
    for i, vid in enumerate(ids, 1):
        arr = group[vid]
        attrs = volume_attributes(np.asarray(arr[...]), arr.attrs["spacing"])
        attrs["prompt"] = render_prompt(attrs)
        rows.append({"volume_id": vid, **attrs})
        log.info("[%d/%d] %s: nodules %d, cysts %d, effusions %d", i, len(ids), vid,
                 attrs["nodule_count"], attrs["cyst_count"], attrs["effusion_count"])
    df = pd.DataFrame(rows)
    if df.empty:
        df = pd.DataFrame(columns=["volume_id", "prompt"])
    write_parquet(df, out)
    return df


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--masks", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    run_shard(args.masks, args.out)


if __name__ == "__main__":
    main()
