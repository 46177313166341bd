"""Honest attributes at the edge of the scan, the same through every segmentation route.

A structure cut by the field of view is marked partially imaged; one outside the scan reads "not seen
in the scan" (never "0.0 ml"); one the segmenter does not produce reads "not assessed". Real data from
../shared/data (skipped when absent): TotalSegmentator's example CT (112 slices, 3 mm) and its label
map, cut into two slabs, each segmented three ways: per-structure files, the label map with its label
names, and the `totalsegmentator` backend (a stand-in executable that writes the real label map).
About 5 s on a 2-core machine.
"""

from __future__ import annotations

import math
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import REPO, SHARED_DATA, split_labelmap

from pipeline import attributes, regions, segment
from pipeline.constants import ATTRIBUTE_STRUCTURES

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
TSV = "label-maps/totalsegmentator_v2_total.tsv"


def _slab(shared: Path, out: Path, z0: int, z1: int) -> tuple[Path, Path]:
    """Slices z0..z1 of the example CT and of its label map, geometry kept (the same physical voxels)."""
    ts = shared / "totalsegmentator"
    out.mkdir(parents=True)
    ct = sitk.ReadImage(str(ts / "example_ct.nii.gz"))[:, :, z0:z1]
    seg = sitk.ReadImage(str(ts / "example_seg_fast_force_split.nii.gz"))[:, :, z0:z1]
    sitk.WriteImage(ct, str(out / "ct.nii.gz"), useCompression=True)
    sitk.WriteImage(seg, str(out / "seg.nii.gz"), useCompression=True)
    return out / "ct.nii.gz", out / "seg.nii.gz"


def _standin_totalsegmentator(folder: Path, labelmap: Path) -> Path:
    exe = folder / "TotalSegmentator"
    exe.write_text(f"#!{sys.executable}\nimport shutil, sys\nargs = sys.argv[1:]\nassert '--ml' in args\n"
                   f"shutil.copy({str(labelmap)!r}, args[args.index('-o') + 1])\n", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def _attributes(work: Path, ct: Path, backend: str, **where: str) -> pd.Series:
    manifest = pd.DataFrame([{"volume_id": "case01", "shard": 0, "ct_path": str(ct), **where}])
    kw = {}
    if backend == "totalsegmentator":
        kw = {"masks_out": work / "ts", "cfg": {"command": where.pop("command"), "label_names": where.pop("names")}}
        manifest = manifest.drop(columns=["command", "names"]).assign(mask_dir="")
    seg = segment.run_shard(manifest, 0, backend, work / "seg.parquet", **kw)
    regions.run_shard(manifest, 0, TABLE, work / "masks.zarr", work / "qc.parquet", segment=seg)
    return attributes.run_shard(work / "masks.zarr", work / "attrs.parquet").iloc[0]


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, pd.Series]]:
    """slab -> route -> the attribute row."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not present at {SHARED_DATA}")
    shared_data = SHARED_DATA
    tmp = tmp_path_factory.mktemp("honest")
    names = regions.read_label_names(shared_data / TSV)
    out: dict[str, dict[str, pd.Series]] = {}
    for slab, (z0, z1) in {"pelvis": (0, 60), "upper_abdomen": (80, 112)}.items():
        ct, seg = _slab(shared_data, tmp / slab, z0, z1)
        exe = _standin_totalsegmentator(tmp / slab, seg)
        out[slab] = {
            "folder": _attributes(tmp / slab / "a", ct, "precomputed",
                                  mask_dir=str(split_labelmap(seg, names, tmp / slab / "seg"))),
            "labelmap": _attributes(tmp / slab / "b", ct, "precomputed", mask_dir=str(seg),
                                    mask_label_names=str(shared_data / TSV)),
            "totalsegmentator": _attributes(tmp / slab / "c", ct, "totalsegmentator", command=str(exe),
                                            names=str(shared_data / TSV)),
        }
    return out


def test_every_route_gives_the_same_attributes(routes) -> None:
    for slab, by_route in routes.items():
        first = by_route["folder"]
        for route, row in by_route.items():
            assert row["prompt"] == first["prompt"], (slab, route)
            for s in ATTRIBUTE_STRUCTURES:
                a, b = row[f"{s}_ml"], first[f"{s}_ml"]
                assert (math.isnan(a) and math.isnan(b)) or a == b, (slab, route, s)
                assert row[f"{s}_partial"] == first[f"{s}_partial"], (slab, route, s)


def test_organs_outside_the_scan_are_not_seen_never_zero(routes) -> None:
    pelvis = routes["pelvis"]["folder"]  # slices 0..59: below the liver, the kidneys and the lungs
    for s in ("liver", "left_kidney", "right_kidney", "left_lower_lobe"):
        assert math.isnan(pelvis[f"{s}_ml"]) and pelvis[f"{s}_assessed"] and not pelvis[f"{s}_partial"], s
    prompt = pelvis["prompt"]
    assert "Liver: not seen in the scan" in prompt and "- Left: not seen in the scan" in prompt
    assert "0.0 ml" not in prompt
    # TotalSegmentator v2 has no heart chambers: not assessed (and not 'not seen')
    assert "- Left Atrium: not assessed" in prompt and not pelvis["left_atrium_assessed"]
    # it does segment kidney cysts: the cyst channel is assessed, none found
    assert "Cyst:\n- count: 0" in prompt


def test_a_liver_cut_by_the_field_of_view_is_partially_imaged(routes, shared_data: Path) -> None:
    row = routes["upper_abdomen"]["labelmap"]  # slices 80..111: the liver runs past both ends
    seg = sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_seg_fast_force_split.nii.gz"))[:, :, 80:112]
    lab = sitk.GetArrayFromImage(seg)
    voxel_ml = float(np.prod(seg.GetSpacing())) / 1000
    liver = round(int((lab == 5).sum()) * voxel_ml, 1)
    assert row["liver_ml"] == pytest.approx(liver) and row["liver_partial"]
    assert f"Liver: {liver:.1f} ml (partially imaged)" in row["prompt"]
    # the right kidney (slices 66..101 of the whole scan) is cut at slice 80; the left one (72..104) too
    assert row["right_kidney_partial"] and row["left_kidney_partial"]
    # the lung bases reach the top slice of the scan
    assert row["left_lower_lobe_partial"]


def test_a_structure_inside_the_scan_is_not_partial() -> None:
    labels = np.zeros((8, 10, 10), np.uint32)
    bit = np.uint32(1 << regions.CHANNELS.index("liver"))
    labels[2:5, 3:6, 3:6] = bit
    inside = attributes.volume_attributes(labels, (10.0, 10.0, 10.0))
    assert inside["liver_ml"] == 27.0 and not inside["liver_partial"]
    assert "Liver: 27.0 ml\n" in attributes.render_prompt(inside)
    for face in [(0, 5, 5), (7, 5, 5), (3, 0, 5), (3, 9, 5), (3, 5, 0), (3, 5, 9)]:
        touched = labels.copy()
        touched[face] = bit
        cut = attributes.volume_attributes(touched, (10.0, 10.0, 10.0))
        assert cut["liver_partial"] and "Liver: 28.0 ml (partially imaged)\n" in attributes.render_prompt(cut), face
