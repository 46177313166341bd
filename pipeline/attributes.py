"""Patient-specific attributes (paper Sec. 3.4, Fig. 4 and 5) from the compact mask arrays.

Measured per volume, from `results/masks/shard-<k>.zarr`:
- organ volumes: voxel count x voxel volume (mm^3) / 1000 -> ml, for the 5 lobes, 4 heart chambers,
  liver and both kidneys (the counts the regions stage records in `channel_voxels` as it assembles
  the array; counted here, inside `channel_boxes`, for a store without them);
- lesions (nodule, cyst, effusion): connected components with 26-connectivity (faces, edges and
  corners touch), components smaller than `min_lesion_mm3` dropped; per component its diameter =
  the largest bounding-box extent in mm (voxel count along each axis x that axis' spacing: the
  paper's Fig. 4 box, in physical units) and its location = the lobe / kidney / liver (cysts) or side
  (effusions) with the largest overlap after a 3-voxel dilation (an effusion lies beside the lung,
  not inside it); "undetermined" when nothing overlaps.

What a structure's numbers mean (the same through every segmentation backend; the words are listed
in docs/attributes.md):
- not assessed: no input structure maps to the channel (the segmenter does not produce it, e.g. heart
  chambers with TotalSegmentator, or a mask file missing from the folder): volume NaN, `_assessed` false;
- not seen in the scan: the segmenter produces it but found no voxel (an organ outside the field of
  view): volume NaN, not 0.0, `_assessed` true;
- partially imaged: the structure touches a face of the scan grid (first or last slice, or an in-plane
  edge), so the scan cut it and its volume is a lower bound: `_partial` true.

Parquet `results/attributes/shard-<k>.parquet`, one row per volume (schema `SCHEMA`, fixed even for an
empty shard):
  volume_id                 string
  <structure>_ml            float64, 1 decimal; NaN when not assessed or not seen in the scan
                            (12 columns, ATTRIBUTE_STRUCTURES)
  <structure>_partial       bool: seen, and touching the scan boundary (a lower bound)
  <structure>_assessed      bool: the segmentation provides that structure at all
  <lesion>_count            int32, components >= min_lesion_mm3 (3 columns: nodule, cyst, effusion)
  <lesion>_diameters_mm     list<float64>, 1 decimal, largest first
  <lesion>_locations        list<string>, same order as the diameters
  <lesion>_assessed         bool: the segmentation provides that lesion channel at all
  prompt                    string: the attribute block of Fig. 5 rendered from the columns above
The file's metadata holds `min_lesion_mm3` and the channel table version.
QC `results/qc/attributes/shard-<k>.parquet`: volume_id, stage, status, error.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from scipy import ndimage

from pipeline.constants import ATTRIBUTE_STRUCTURES, CHANNELS, HEART_CHAMBERS, LESIONS, LOBES
from pipeline.io import InputError, atomic_output, setup_logging, write_parquet
from pipeline.regions import open_masks, read_labels, unpack_channel
from pipeline.stage_config import settings_from_cli

DEFAULT_MIN_LESION_MM3 = 10.0
LOCATION_PAD = 3  # voxels of dilation before measuring overlap

# Where a lesion of each kind is located: candidate channels -> words in the prompt.
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

SCHEMA = pa.schema(
    [pa.field("volume_id", pa.string())]
    + [pa.field(f"{s}_ml", pa.float64()) for s in ATTRIBUTE_STRUCTURES]
    + [pa.field(f"{s}_partial", pa.bool_()) for s in ATTRIBUTE_STRUCTURES]
    + [pa.field(f"{s}_assessed", pa.bool_()) for s in ATTRIBUTE_STRUCTURES]
    + [f for lesion in LESIONS for f in (
        pa.field(f"{lesion}_count", pa.int32()),
        pa.field(f"{lesion}_diameters_mm", pa.list_(pa.float64())),
        pa.field(f"{lesion}_locations", pa.list_(pa.string())),
        pa.field(f"{lesion}_assessed", pa.bool_()),
    )]
    + [pa.field("prompt", pa.string())]
)
QC_COLUMNS = ("volume_id", "stage", "status", "error")


def channel_counts(labels: np.ndarray, channels: Sequence[str]) -> dict[str, int]:
    """Voxels per channel: each byte of the packed word made contiguous once, then AND + count per bit."""
    flat = np.ascontiguousarray(labels, dtype="<u4").reshape(-1)
    as_bytes = flat.view(np.uint8).reshape(-1, 4)  # little-endian: column k holds bits 8k..8k+7
    planes: dict[int, np.ndarray] = {}
    tmp: dict[int, np.ndarray] = {}
    out: dict[str, int] = {}
    for name in channels:
        bit = CHANNELS.index(name)
        k = bit // 8
        if k not in planes:
            planes[k] = np.ascontiguousarray(as_bytes[:, k])
            tmp[k] = np.empty_like(planes[k])
        np.bitwise_and(planes[k], np.uint8(1 << (bit % 8)), out=tmp[k])
        out[name] = int(np.count_nonzero(tmp[k]))
    return out


def boxed_counts(labels: np.ndarray, channels: Sequence[str], boxes: dict[str, Sequence[int]]) -> dict[str, int]:
    """Voxels per channel, each counted inside its bounding box only (absent from `boxes` = empty)."""
    out: dict[str, int] = {}
    for name in channels:
        box = boxes.get(name)
        if box is None:
            out[name] = 0
            continue
        z0, z1, y0, y1, x0, x1 = (int(v) for v in box)
        sub = labels[z0:z1, y0:y1, x0:x1]
        out[name] = int(np.count_nonzero(np.bitwise_and(sub, np.uint32(1 << CHANNELS.index(name)))))
    return out


def boundary_bits(labels: np.ndarray) -> int:
    """The channel bits present on any of the six faces of the grid (first / last slice, row, column)."""
    if labels.size == 0:
        return 0
    faces = (labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1])
    word = 0
    for face in faces:
        word |= int(np.bitwise_or.reduce(face, axis=None))
    return word


def volume_attributes(labels: np.ndarray, spacing_xyz: Sequence[float],
                      min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
                      available: Sequence[str] | None = None,
                      boxes: dict[str, Sequence[int]] | None = None,
                      voxels: dict[str, int] | None = None) -> dict[str, object]:
    """All attribute columns of one volume except `volume_id` and `prompt`.

    `available`: channels the segmentation provides (None: all); others get NaN volumes / not assessed.
    `boxes`: each non-empty channel's bounding box (z0, z1, y0, y1, x0, x1) as the regions stage
    records it; when given, counting and lesion search look only inside them.
    `voxels`: each channel's voxel count as the regions stage records it (`channel_voxels`, counted
    as it assembled the array); used when it covers every channel measured here, else they are counted.
    """
    spacing_zyx = np.asarray(spacing_xyz, dtype=float)[::-1]
    voxel_mm3 = float(np.prod(spacing_zyx))
    have = set(CHANNELS if available is None else available)
    wanted = (*ATTRIBUTE_STRUCTURES, *LESIONS)
    if isinstance(voxels, dict) and all(isinstance(voxels.get(n), int) for n in wanted):
        counts = {n: int(voxels[n]) for n in wanted}
    else:
        counts = channel_counts(labels, wanted) if boxes is None else boxed_counts(labels, wanted, boxes)
    attrs: dict[str, object] = {}
    edge = boundary_bits(labels)
    for name in ATTRIBUTE_STRUCTURES:
        seen = name in have and counts[name] > 0
        attrs[f"{name}_ml"] = round(counts[name] * voxel_mm3 / 1000.0, 1) if seen else math.nan
        attrs[f"{name}_partial"] = bool(seen and edge >> CHANNELS.index(name) & 1)
        attrs[f"{name}_assessed"] = name in have
    min_voxels = max(1, int(math.ceil(min_lesion_mm3 / voxel_mm3 - 1e-9))) if min_lesion_mm3 > 0 else 1
    for lesion in LESIONS:
        box = None if boxes is None or lesion not in boxes else _padded(boxes[lesion], labels.shape)
        found = measure_lesions(labels, lesion, spacing_zyx, min_voxels, box) if counts[lesion] else []
        found.sort(key=lambda d: -d[0])
        attrs[f"{lesion}_count"] = len(found)
        attrs[f"{lesion}_diameters_mm"] = [d for d, _ in found]
        attrs[f"{lesion}_locations"] = [loc for _, loc in found]
        attrs[f"{lesion}_assessed"] = lesion in have
    return attrs


def _channel_box(labels: np.ndarray, channel: str, pad: int) -> tuple[slice, ...] | None:
    """Bounding box (grown by `pad`) of one channel's voxels, found slab by slab."""
    m = unpack_channel(labels, channel)
    zs = np.flatnonzero(m.reshape(m.shape[0], -1).max(axis=1))
    if not zs.size:
        return None
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    m = m[z0:z1]
    ys = np.flatnonzero(m.any(axis=(0, 2)))
    xs = np.flatnonzero(m.any(axis=(0, 1)))
    lo = (z0, int(ys[0]), int(xs[0]))
    hi = (z1, int(ys[-1]) + 1, int(xs[-1]) + 1)
    return tuple(slice(max(a - pad, 0), min(b + pad, n)) for a, b, n in zip(lo, hi, labels.shape))


def _padded(box: Sequence[int], shape: Sequence[int]) -> tuple[slice, ...]:
    z0, z1, y0, y1, x0, x1 = (int(v) for v in box)
    pad = LOCATION_PAD
    return tuple(slice(max(a - pad, 0), min(b + pad, n)) for a, b, n in zip((z0, y0, x0), (z1, y1, x1), shape))


def measure_lesions(labels: np.ndarray, lesion: str, spacing_zyx: np.ndarray, min_voxels: int,
                    box: tuple[slice, ...] | None = None) -> list[tuple[float, str]]:
    """(diameter mm, location) per connected component (26-connectivity) of at least `min_voxels`,
    in the order `ndimage.label` numbers the components of the whole box (first voxel, raster order).

    The box is cut at planes the lesion does not touch (no 26-connected component crosses an empty
    plane), and each part is labelled on its own: e.g. a left and a right effusion are labelled in two
    small boxes instead of one that spans the chest.
    """
    if box is None:
        box = _channel_box(labels, lesion, LOCATION_PAD)
    if box is None:
        return []
    sub = labels[box]
    bits = np.uint32(1 << CHANNELS.index(lesion))
    mask = np.bitwise_and(sub, bits) != 0
    found: list[tuple[int, float, str]] = []  # (first voxel's raster index in `sub`, diameter, location)
    for part in _independent_parts(mask):
        if not mask[part].any():  # a product of runs along the three axes can hold nothing
            continue
        components, n = ndimage.label(mask[part], structure=np.ones((3, 3, 3), bool))
        if n == 0:
            continue
        sizes = np.bincount(components.ravel(), minlength=n + 1)
        for idx, sl in enumerate(ndimage.find_objects(components), 1):
            if sl is None or sizes[idx] < min_voxels:
                continue
            extent = np.array([s.stop - s.start for s in sl]) * spacing_zyx
            where = tuple(slice(s.start + p.start, s.stop + p.start) for s, p in zip(sl, part))  # in `sub`
            own = components[sl] == idx
            yy, xx = np.unravel_index(int(np.argmax(own[0])), own.shape[1:])  # first voxel: lowest z, then y, x
            first = ((where[0].start * sub.shape[1]) + where[1].start + int(yy)) * sub.shape[2] + where[2].start + int(xx)
            found.append((first, round(float(extent.max()), 1), _locate(lesion, own, where, sub)))
    found.sort(key=lambda f: f[0])
    return [(d, loc) for _, d, loc in found]


def _runs(flags: np.ndarray) -> list[slice]:
    """Slices of the runs of True in a 1-D boolean array."""
    idx = np.flatnonzero(flags)
    if not idx.size:
        return []
    cut = np.flatnonzero(np.diff(idx) > 1)
    starts = [int(idx[0]), *(int(i) for i in idx[cut + 1])]
    stops = [*(int(i) + 1 for i in idx[cut]), int(idx[-1]) + 1]
    return [slice(a, b) for a, b in zip(starts, stops)]


def _independent_parts(mask: np.ndarray) -> list[tuple[slice, ...]]:
    """Boxes that together hold every True voxel, separated by all-False planes along some axis."""
    runs = [_runs(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    return [(z, y, x) for z in runs[0] for y in runs[1] for x in runs[2]]


def _locate(lesion: str, own: np.ndarray, where: tuple[slice, ...], sub: np.ndarray) -> str:
    """Where one component (`own`: its voxels in its bounding box `where` of `sub`) lies: the candidate
    channel (or side) with the most voxels in the component grown by LOCATION_PAD voxels."""
    pad = LOCATION_PAD
    big = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(where, sub.shape))
    comp = np.zeros(tuple(b.stop - b.start for b in big), np.uint8)
    comp[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(where, big))] = own
    # LOCATION_PAD dilations with the 26-neighbourhood = one maximum filter of width 2 * pad + 1
    grown = ndimage.maximum_filter(comp, size=2 * pad + 1).view(bool)
    hit = sub[big][grown]  # the channel words under the grown component

    def count(channel: str) -> int:
        return int(np.count_nonzero(np.bitwise_and(hit, np.uint32(1 << CHANNELS.index(channel)))))

    if lesion == "effusion":
        scores = {side: sum(count(c) for c in chans) for side, chans in _SIDES.items()}
        names = {"right": "right", "left": "left"}
    else:
        scores = {c: count(c) for c in LOCATION_CANDIDATES[lesion]}
        names = LOCATION_CANDIDATES[lesion]
    best = max(scores, key=lambda k: scores[k])
    return names[best] if scores[best] > 0 else "undetermined"


NOT_ASSESSED = "not assessed"
NOT_SEEN = "not seen in the scan"
PARTIAL = "partially imaged"


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt_ml(attrs: dict[str, object], name: str) -> str:
    """One structure's volume in the prompt: "12.3 ml", "12.3 ml (partially imaged)", "not seen in the
    scan" or "not assessed". A table without the `_assessed` column (older) reads NaN as not assessed."""
    value = attrs.get(f"{name}_ml")
    if not attrs.get(f"{name}_assessed", not _is_missing(value)):
        return NOT_ASSESSED
    if _is_missing(value):
        return NOT_SEEN
    return f"{float(value):.1f} ml" + (f" ({PARTIAL})" if attrs.get(f"{name}_partial") else "")  # type: ignore[arg-type]


def _fmt_list(values: Sequence[object], number: bool = False) -> str:
    if not len(values):
        return "none"
    return ", ".join(f"{float(v):.1f}" if number else str(v) for v in values)


def render_prompt(attrs: dict[str, object]) -> str:
    """The attribute block of the paper's Fig. 5 (organ volumes, then lesion details).

    Volumes and diameters always carry one decimal, a volume "(partially imaged)" when the structure
    touches the scan boundary; "not seen in the scan" for a structure the segmentation provides but
    did not find; "not assessed" for a structure or lesion channel it does not provide; "none" for
    absent lesions of an assessed channel.
    """
    lines = ["Organ Volumes:", "Lung:"]
    lines += [f"- {PROMPT_NAMES[n]}: {_fmt_ml(attrs, n)}" for n in LOBES]
    lines.append("Heart:")
    lines += [f"- {PROMPT_NAMES[n]}: {_fmt_ml(attrs, n)}" for n in HEART_CHAMBERS]
    lines.append(f"Liver: {_fmt_ml(attrs, 'liver')}")
    lines += ["Kidney:", f"- Left: {_fmt_ml(attrs, 'left_kidney')}", f"- Right: {_fmt_ml(attrs, 'right_kidney')}"]
    lines.append("Lesion Details:")
    for lesion in LESIONS:
        lines.append(f"{lesion.capitalize()}:")
        if not attrs.get(f"{lesion}_assessed", True):
            lines.append(f"- {NOT_ASSESSED}")
            continue
        lines += [
            f"- count: {attrs[f'{lesion}_count']}",
            f"- diameter (mm): {_fmt_list(attrs[f'{lesion}_diameters_mm'], number=True)}",  # type: ignore[arg-type]
            f"- location: {_fmt_list(attrs[f'{lesion}_locations'])}",  # type: ignore[arg-type]
        ]
    return "\n".join(lines)


def attributes_table(rows: list[dict[str, object]], min_lesion_mm3: float, table_version: object) -> pa.Table:
    columns = {f.name: [r.get(f.name) for r in rows] for f in SCHEMA}
    meta = {"min_lesion_mm3": json.dumps(min_lesion_mm3), "table_version": json.dumps(table_version),
            "schema_doc": "pipeline.attributes module docstring"}
    return pa.Table.from_pydict(columns, schema=SCHEMA.with_metadata(meta))


def run_shard(masks_zarr: Path, out: Path, min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3,
              qc_out: Path | None = None, on_error: str = "fail", threads: int = 1) -> pd.DataFrame:
    log = setup_logging()
    group = open_masks(masks_zarr)
    rows: list[dict[str, object]] = []
    qc: list[dict[str, object]] = []
    ids = list(group.attrs["volume_ids"])
    local = Path(masks_zarr).is_dir()
    buffer: np.ndarray | None = None  # one array reused for every volume of this shard
    for i, vid in enumerate(ids, 1):
        try:
            arr = group[vid]
            spacing = arr.attrs.get("spacing")
            if spacing is None or len(spacing) != 3 or arr.ndim != 3:
                raise InputError(f"volume {vid}: {masks_zarr}/{vid} is not a 3D mask array with a spacing")
            labels = read_labels(arr, Path(masks_zarr) / vid if local else None, buffer, threads)
            if labels.dtype == np.uint32 and labels.flags.c_contiguous:
                buffer = labels
            attrs = volume_attributes(labels, spacing, min_lesion_mm3, arr.attrs.get("channels_available"),
                                      arr.attrs.get("channel_boxes"), arr.attrs.get("channel_voxels"))
        except InputError as exc:
            if on_error != "skip":
                raise
            log.error("%s (skipped)", exc)
            qc.append({"volume_id": vid, "stage": "attributes", "status": "error", "error": str(exc)})
            continue
        attrs["prompt"] = render_prompt(attrs)
        rows.append({"volume_id": vid, **attrs})
        qc.append({"volume_id": vid, "stage": "attributes", "status": "ok", "error": ""})
        log.info("[%d/%d] %s: nodules %d, cysts %d, effusions %d", i, len(ids), vid,
                 attrs["nodule_count"], attrs["cyst_count"], attrs["effusion_count"])
    table = attributes_table(rows, min_lesion_mm3, group.attrs.get("table_version"))
    with atomic_output(out) as tmp:
        pq.write_table(table, tmp)
    if qc_out is not None:
        write_parquet(pd.DataFrame(qc, columns=list(QC_COLUMNS)), qc_out)
    return table.to_pandas()


@dataclass(frozen=True)
class AttributesSettings:
    """The stage's settings: the config's `attributes` section (its `threads` is the job's --threads)."""

    min_lesion_mm3: float = DEFAULT_MIN_LESION_MM3

    def __post_init__(self) -> None:
        # a float however the JSON wrote it (10 or 10.0): the table's metadata records str(min_lesion_mm3)
        object.__setattr__(self, "min_lesion_mm3", float(self.min_lesion_mm3))


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.attributes", description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--masks", type=Path, required=True, help="the shard's compact mask store (.zarr)")
    ap.add_argument("--out", type=Path, required=True, help="the shard's attribute table (.parquet)")
    ap.add_argument("--qc", type=Path, help="per-volume QC table")
    ap.add_argument("--params-json", default="{}",
                    help='AttributesSettings as JSON, e.g. \'{"min_lesion_mm3": 10}\' (omitted keys: defaults)')
    ap.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                    help="a bad volume stops the job (fail) or is recorded in the QC table (skip)")
    ap.add_argument("--threads", type=int, default=1, help="threads decoding a volume's mask chunks")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, AttributesSettings, args.params_json, section="attributes")
    run_shard(args.masks, args.out, settings.min_lesion_mm3, args.qc, args.on_error, max(1, args.threads))


if __name__ == "__main__":
    main()
