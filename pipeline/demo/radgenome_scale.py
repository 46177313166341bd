"""One synthetic chest CT of RadGenome-Chest CT's real size, with every one of its structure files.

`write_radgenome_scale_case(out_dir)` writes, under `out_dir`:
  volumes/<id>.nii.gz            int16 HU, 360 x 300 x 110 voxels (x, y, z) at exactly 1 x 1 x 3 mm
  masks/seg_<id>/<name>.nii.gz   one uint8 mask per RadGenome name of `config/regions.yaml` (210 files)
  case.json                      id, geometry, names, how many masks are non-empty

The phantom's own structures (lobes, heart chambers, vessels, bones, abdominal organs, lesions) are
exact unions of its leaf labels, as in the demo cohort. The other names get plausible stand-ins so
the files decompress like real ones: numbered ribs and vertebrae are z-bands of the rib / spine label,
liver segments are parts of the liver, structures outside a chest CT's field (pelvis, skull, neck) and
rare lesions are empty (RadGenome ships empty masks for those too), everything else is a seeded
ellipsoid inside the body. It feeds `benchmarks/regions_radgenome_scale.py`.

CLI: `python -m pipeline.demo.radgenome_scale --out DIR [--seed 0] [--shape X Y Z]`
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import yaml

from pipeline.demo.cohort import CaseSpec, synthesize_case
from pipeline.demo.phantom import ellipsoid
from pipeline.io import atomic_output

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TABLE = REPO / "config" / "regions.yaml"
VOLUME_ID = "train_1_a_1"
# Reasons in the table's `unused` list that mean "not in a chest CT's field of view": empty masks.
_OUTSIDE = ("pelvis", "skull", "head", "neck", "outside the chest", "below the upper abdomen")
_RARE = ("tumor", "embolism")
_NUMBERED = re.compile(r"^(?:(left|right) )?rib (\d+)$|^thoracic vertebrae (\d+) \(t\d+\)$")


def radgenome_names(table: Path | str = DEFAULT_TABLE) -> tuple[list[str], dict[str, str]]:
    """(every RadGenome name of the label table, unused name -> reason)."""
    raw = yaml.safe_load(Path(table).read_text(encoding="utf-8"))["vocabularies"]["radgenome"]
    unused = {str(k): str(v) for k, v in (raw.get("unused") or {}).items()}
    return sorted([*map(str, raw["structures"]), *unused]), unused


def _band(mask: np.ndarray, k: int, n: int) -> np.ndarray:
    """Band k (1 = top) of n equal z-bands of the mask's own z extent."""
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if not zs.size:
        return mask
    edges = np.linspace(zs.max() + 1, zs.min(), n + 1).round().astype(int)
    out = np.zeros_like(mask)
    lo, hi = edges[k], edges[k - 1]
    out[lo:hi] = mask[lo:hi]
    return out


def _part(mask: np.ndarray, axis: int, lower: bool) -> np.ndarray:
    """The lower or upper half of a mask along one array axis (split at its centre of mass)."""
    idx = np.nonzero(mask)
    if not idx[0].size:
        return mask
    cut = int(np.mean(idx[axis]))
    out = mask.copy()
    sl = [slice(None)] * 3
    sl[axis] = slice(cut, None) if lower else slice(None, cut)
    out[tuple(sl)] = False
    return out


def _derived(name: str, base: dict[str, np.ndarray], unused: dict[str, str], grid, body: np.ndarray
             ) -> np.ndarray:
    shape = grid.shape
    if name in unused and any(word in unused[name] for word in _OUTSIDE):
        return np.zeros(shape, bool)
    if any(word in name for word in _RARE) or re.match(r"^(cervical|lumbar|sacral) vertebrae", name):
        return np.zeros(shape, bool)
    m = _NUMBERED.match(name)
    if m:
        if m.group(3):
            return _band(base["thoracic vertebrae"], int(m.group(3)), 12)
        rib = base[f"{m.group(1)} rib"] if m.group(1) else base["rib"]
        return _band(rib, int(m.group(2)), 12)
    if "liver" in name or name == "caudate lobe":
        liver = base["liver"]
        if name.startswith("left"):
            liver = _part(liver, 2, lower=False)  # x grows to the patient's left: upper half
        elif name.startswith("right"):
            liver = _part(liver, 2, lower=True)
        if "superior" in name:
            liver = _part(liver, 0, lower=False)
        elif "inferior" in name:
            liver = _part(liver, 0, lower=True)
        return liver
    # a seeded ellipsoid inside the body, 6-35 mm semi-axes
    rng = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    idx = np.argwhere(body[:: 4, :: 8, :: 8])
    k = idx[rng.integers(len(idx))] * np.array([4, 8, 8])
    sx, sy, sz = grid.spacing
    nz, ny, nx = shape
    centre = np.array([(k[2] - (nx - 1) / 2) * sx, (k[1] - (ny - 1) / 2) * sy, k[0] * sz])
    out = np.zeros(shape, bool)
    shape_box = ellipsoid(grid, centre, rng.uniform(6.0, 35.0, 3))
    if shape_box is not None:
        box, inside = shape_box
        out[box] = inside
    return out & body


def case_masks(names: Sequence[str], unused: dict[str, str], base: dict[str, np.ndarray], grid,
               body: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    for name in names:
        yield name, (base[name] if name in base else _derived(name, base, unused, grid, body))


def write_radgenome_scale_case(out_dir: Path | str, seed: int = 0, shape_xyz: Sequence[int] = (360, 300, 110),
                               table: Path | str = DEFAULT_TABLE) -> Path:
    """Write the case atomically into `out_dir` (replaced when it exists); returns `out_dir`."""
    out_dir = Path(out_dir)
    names, unused = radgenome_names(table)
    nx, ny, nz = (int(v) for v in shape_xyz)
    spec = CaseSpec(VOLUME_ID, "train_1", "train", 0, 0, seed, (nz, ny, nx), (1.0, 1.0, 3.0))
    ct, base, meta, grid, origin = synthesize_case(spec, exact_spacing=True)
    body = ct > -500
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        ref = sitk.GetImageFromArray(ct)
        ref.SetSpacing(grid.spacing)
        ref.SetOrigin(origin)
        (tmp / "volumes").mkdir()
        sitk.WriteImage(ref, str(tmp / "volumes" / f"{VOLUME_ID}.nii.gz"), useCompression=True)
        mdir = tmp / "masks" / f"seg_{VOLUME_ID}"
        mdir.mkdir(parents=True)
        non_empty = 0
        for name, mask in case_masks(names, unused, base, grid, body):
            img = sitk.GetImageFromArray(mask.astype(np.uint8))
            img.CopyInformation(ref)
            sitk.WriteImage(img, str(mdir / f"{name}.nii.gz"), useCompression=True)
            non_empty += bool(mask.any())
        info = {"volume_id": VOLUME_ID, "size_xyz": [nx, ny, nz], "spacing_xyz": list(grid.spacing),
                "origin_xyz": list(origin), "n_masks": len(names), "n_non_empty": non_empty,
                "findings": meta["findings"]}
        (tmp / "case.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return out_dir


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo.radgenome_scale", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for volumes/, masks/ and case.json (replaced when it exists)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the phantom and the stand-in structures (default: 0)")
    ap.add_argument("--shape", type=int, nargs=3, default=(360, 300, 110), metavar=("X", "Y", "Z"),
                    help="voxels along x, y, z at 1 x 1 x 3 mm (default: RadGenome's 360 300 110)")
    ap.add_argument("--table", type=Path, default=DEFAULT_TABLE,
                    help="the label table whose RadGenome names get a mask file each (default: config/regions.yaml)")
    args = ap.parse_args(argv)
    out = write_radgenome_scale_case(args.out, args.seed, args.shape, args.table)
    info = json.loads((out / "case.json").read_text(encoding="utf-8"))
    print(f"wrote {out}: {info['n_masks']} masks ({info['n_non_empty']} non-empty), {info['size_xyz']} voxels")


if __name__ == "__main__":
    main()
