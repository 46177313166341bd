"""Planted findings: drawn per case, drawn into the intensities (and lesion masks), recorded exactly.

`plan_findings` picks which finding kinds a case gets; anatomy-level kinds (cardiomegaly, pericardial
effusion, hiatal hernia) are passed to `build_phantom`; `plant_label_findings` changes labels (pleural
effusion, lymph nodes); `plant_intensity_findings` changes HU (emphysema, opacities, nodules,
calcifications, kidney cysts). Every function returns JSON-ready records: `class` (a CT-RATE class
name or "Kidney cyst") plus its parameters; sizes are integer millimetres, centres are (z, y, x)
voxel indices. A finding that cannot be placed is dropped, never recorded, so labels stay exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import ndimage

from pipeline.demo.phantom import (
    L_AORTA,
    L_KID_L,
    L_KID_R,
    L_MED,
    L_MYO,
    L_PERICARD,
    L_PLEURAL,
    LOBE_LABEL,
    LUNG_LABELS,
    Grid,
    Phantom,
    ellipsoid,
)

Finding = dict[str, Any]

# kind -> relative weight of being drawn in an abnormal case
FINDING_WEIGHTS: dict[str, float] = {
    "Lung nodule": 2.2,
    "Pleural effusion": 1.0,
    "Cardiomegaly": 0.9,
    "Emphysema": 1.0,
    "Consolidation": 1.0,
    "Lung opacity": 0.9,
    "Lymphadenopathy": 0.9,
    "Pericardial effusion": 0.7,
    "Arterial wall calcification": 1.0,
    "Coronary artery wall calcification": 0.9,
    "Hiatal hernia": 0.8,
    "Atelectasis": 0.7,
    "Kidney cyst": 1.1,
}
NORMAL_FRACTION = 0.30
NODULE_HU, CONSOLIDATION_HU, GGO_HU, ATELECTASIS_HU = 35.0, -5.0, -520.0, -90.0
EMPHYSEMA_HU, CALCIFIC_HU, CYST_HU, NODE_HU = -965.0, 1000.0, 5.0, 42.0

LYMPH_STATIONS: tuple[str, ...] = ("right paratracheal", "subcarinal", "prevascular", "aortopulmonary window",
                                   "right hilar", "left hilar")


def plan_findings(rng: np.random.Generator, weights: Mapping[str, float] | None = None,
                  normal_fraction: float = NORMAL_FRACTION) -> list[str]:
    """`normal_fraction` of cases normal; otherwise 1-3 distinct finding kinds (at most as many as there
    are kinds), drawn by `weights` (default: all kinds, FINDING_WEIGHTS), returned in FINDING_WEIGHTS order."""
    weights = FINDING_WEIGHTS if weights is None else weights
    if rng.random() < normal_fraction:
        return []
    k = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    kinds = [c for c in FINDING_WEIGHTS if c in weights]
    w = np.array([weights[c] for c in kinds])
    picked = rng.choice(len(kinds), size=min(k, len(kinds)), replace=False, p=w / w.sum())
    return [kinds[i] for i in sorted(picked)]


def side_of_lobe(lobe: str) -> str:
    return lobe.split("_")[0]


def _mm_sampling(grid: Grid) -> tuple[float, float, float]:
    sx, sy, sz = grid.spacing
    return (sz, sy, sx)


def _bbox(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...] | None:
    idx = np.nonzero(mask)
    if not idx[0].size:
        return None
    return tuple(slice(max(int(i.min()) - pad, 0), min(int(i.max()) + pad + 1, n))
                 for i, n in zip(idx, mask.shape))


def _fit_centre(grid: Grid, region: np.ndarray, min_dist: float, rng: np.random.Generator
                ) -> tuple[np.ndarray, float] | None:
    """A random voxel of `region` at least `min_dist` mm from its border -> (k, j, i), max distance."""
    box = _bbox(region)
    if box is None:
        return None
    padded = np.pad(region[box], 1)
    dist = ndimage.distance_transform_edt(padded, sampling=_mm_sampling(grid))[1:-1, 1:-1, 1:-1]
    dmax = float(dist.max())
    cand = np.argwhere(dist >= min_dist)
    if not len(cand):
        return None
    k = cand[rng.integers(len(cand))] + np.array([b.start for b in box])
    return k, dmax


def _max_inner_distance(grid: Grid, region: np.ndarray) -> float:
    box = _bbox(region)
    if box is None:
        return 0.0
    return float(ndimage.distance_transform_edt(np.pad(region[box], 1), sampling=_mm_sampling(grid)).max())


def _index_to_mm(grid: Grid, k: np.ndarray) -> np.ndarray:
    nz, ny, nx = grid.shape
    sx, sy, sz = grid.spacing
    return np.array([(k[2] - (nx - 1) / 2) * sx, (k[1] - (ny - 1) / 2) * sy, k[0] * sz])


def _sphere(grid: Grid, centre_idx: np.ndarray, radius: float) -> tuple[tuple[slice, ...], np.ndarray] | None:
    c = _index_to_mm(grid, centre_idx)
    return ellipsoid(grid, c, np.array([radius, radius, radius]))


# ---- label-level findings -----------------------------------------------------------------------

def plant_pleural_effusion(ph: Phantom, rng: np.random.Generator) -> Finding | None:
    side = str(rng.choice(["right", "left", "bilateral"], p=[0.4, 0.3, 0.3]))
    sides = ["right", "left"] if side == "bilateral" else [side]
    Z, Y, X = ph.grid.coords()
    T = Z / ph.grid.zext
    lung = np.isin(ph.labels, LUNG_LABELS)
    depth: dict[str, int] = {}
    for sd in sides:
        d = int(rng.integers(5, 15))
        hemi = lung & ((X < 0) if sd == "right" else (X > 0))
        ymax = np.where(hemi, np.broadcast_to(Y, hemi.shape), -np.inf).max(axis=(1, 2))  # per slice
        fluid = hemi & ((ymax - d)[:, None, None] < Y) & (T < 0.75)
        if fluid.any():
            ph.labels[fluid] = L_PLEURAL
            depth[sd] = d
    if not depth:
        return None
    final = "bilateral" if len(depth) == 2 else next(iter(depth))
    return {"class": "Pleural effusion", "side": final, "depth_mm": depth}


def plant_lymphadenopathy(ph: Phantom, rng: np.random.Generator) -> tuple[Finding, list] | None:
    s, zext = ph.s, ph.grid.zext
    car, hr, hl = ph.landmarks["carina"], ph.landmarks["hilum_right"], ph.landmarks["hilum_left"]
    pos = {
        "right paratracheal": car + np.array([-0.17 * s, -0.02 * s, 0.10 * zext]),
        "subcarinal": car + np.array([0.01 * s, 0.13 * s, -0.07 * zext]),
        "prevascular": ph.landmarks["arch"] + np.array([-0.08 * s, -0.30 * s, -0.02 * zext]),
        "aortopulmonary window": car + np.array([0.14 * s, -0.06 * s, 0.04 * zext]),
        "right hilar": hr + np.array([-0.03 * s, 0.09 * s, -0.02 * zext]),
        "left hilar": hl + np.array([0.03 * s, 0.10 * s, -0.02 * zext]),
    }
    n = int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
    stations = sorted(rng.choice(len(LYMPH_STATIONS), size=n, replace=False))
    nodes, overrides = [], []
    for i in stations:
        name = LYMPH_STATIONS[i]
        d = int(rng.integers(11, 17))
        r = d / 2.0
        sh = ellipsoid(ph.grid, pos[name], np.array([r, r, r * 1.25]))
        if sh is None:
            continue
        box, m = sh
        m = np.broadcast_to(m, ph.labels[box].shape) & np.isin(ph.labels[box],
                                                              (L_MED, L_PERICARD) + LUNG_LABELS)
        if not m.any():
            continue
        ph.labels[box][m] = L_MED
        overrides.append((box, m))
        nodes.append({"station": name, "size_mm": d, "centre_voxel": ph.grid.voxel(pos[name])})
    if not nodes:
        return None
    rec = {"class": "Lymphadenopathy", "nodes": nodes, "size_mm": max(n["size_mm"] for n in nodes)}
    return rec, overrides


# ---- intensity-level findings -------------------------------------------------------------------

def _lobe_mask(ph: Phantom, lobe: str) -> np.ndarray:
    return ph.labels == LOBE_LABEL[lobe]


def plant_emphysema(ph: Phantom, hu: np.ndarray, field: np.ndarray,
                    rng: np.random.Generator) -> Finding | None:
    severity = str(rng.choice(["mild", "moderate"], p=[0.6, 0.4]))
    frac = 0.12 if severity == "mild" else 0.28
    Z, _, _ = ph.grid.coords()
    T = np.broadcast_to(Z / ph.grid.zext, hu.shape)
    parench = np.isin(ph.labels, LUNG_LABELS) & ~ph.vessels
    if not parench.any():
        return None
    score = field + 2.5 * (T - 0.5)          # upper-lobe predominant
    thr = np.quantile(score[parench], 1.0 - frac)
    em = parench & (score > thr)
    hu[em] = EMPHYSEMA_HU
    return {"class": "Emphysema", "severity": severity, "distribution": "upper lobe predominant",
            "side": "bilateral", "volume_fraction": round(float(em.sum() / parench.sum()), 3)}


def _patch(ph: Phantom, lobe: str, field: np.ndarray, busy: np.ndarray, rng: np.random.Generator,
           radius: tuple[float, float]) -> tuple[np.ndarray, int, np.ndarray] | None:
    region = _lobe_mask(ph, lobe) & ~busy
    fit = _fit_centre(ph.grid, region, 3.0, rng)
    if fit is None:
        return None
    k, _ = fit
    semi = rng.uniform(*radius, size=3)
    c = _index_to_mm(ph.grid, k)
    sh = ellipsoid(ph.grid, c, semi * 1.3)
    if sh is None:
        return None
    box, _ = sh
    z, y, x = ph.grid.coords(box)
    r2 = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2
    m = (r2 + 0.35 * field[box] <= 1.0) & region[box]
    m[tuple(k - np.array([b.start for b in box]))] = True
    full = np.zeros(ph.labels.shape, bool)
    full[box] = m
    return full, int(round(2 * semi.max())), k


def _pick_lobe(rng: np.random.Generator, lower_bias: bool = False) -> str:
    lobes = list(LOBE_LABEL)
    w = np.array([1.0, 0.8, 1.6, 1.0, 1.6] if lower_bias else [1.0] * 5)
    return lobes[int(rng.choice(len(lobes), p=w / w.sum()))]


def plant_lung_patch(kind: str, ph: Phantom, hu: np.ndarray, field: np.ndarray, busy: np.ndarray,
                     rng: np.random.Generator) -> Finding | None:
    """Consolidation (dense, hides vessels) or Lung opacity (ground glass, vessels visible)."""
    for _ in range(5):
        lobe = _pick_lobe(rng, lower_bias=kind == "Consolidation")
        res = _patch(ph, lobe, field, busy, rng, (3.5, 8.0))
        if res is None:
            continue
        m, size, k = res
        if kind == "Consolidation":
            hu[m] = CONSOLIDATION_HU + 15.0 * field[m]
        else:
            pm = m & ~ph.vessels
            hu[pm] = GGO_HU + 40.0 * field[pm]
        busy |= m
        rec = {"class": kind, "lobe": lobe, "side": side_of_lobe(lobe), "size_mm": size,
               "centre_voxel": [int(v) for v in k]}
        if kind == "Lung opacity":
            rec["pattern"] = "ground glass"
        return rec
    return None


def plant_atelectasis(ph: Phantom, hu: np.ndarray, busy: np.ndarray,
                      rng: np.random.Generator) -> Finding | None:
    for lobe in rng.permutation(["right_lower_lobe", "left_lower_lobe"]):
        lobe = str(lobe)
        region = _lobe_mask(ph, lobe) & ~busy
        if region.sum() < 20:
            continue
        kz = np.nonzero(region.any(axis=(1, 2)))[0]
        k0 = int(kz[min(len(kz) - 1, int(len(kz) * rng.uniform(0.15, 0.4)))])
        pts = np.argwhere(region[k0])
        j, i = pts[rng.integers(len(pts))]
        c = _index_to_mm(ph.grid, np.array([k0, j, i]))
        z, y, x = ph.grid.coords()
        slab = (np.abs(z - c[2] + 0.25 * (y - c[1])) < 0.6 * ph.grid.spacing[2]) & (
            (x - c[0]) ** 2 + (y - c[1]) ** 2 < rng.uniform(8.0, 13.0) ** 2)
        m = slab & region
        if m.sum() < 5:
            continue
        hu[m] = ATELECTASIS_HU
        busy |= m
        return {"class": "Atelectasis", "lobe": lobe, "side": side_of_lobe(lobe), "pattern": "linear",
                "centre_voxel": [k0, int(j), int(i)]}
    return None


def plant_nodules(ph: Phantom, hu: np.ndarray, busy: np.ndarray, lesion: np.ndarray,
                  rng: np.random.Generator) -> Finding | None:
    """1-3 solid nodules (4-25 mm, shrunk to fit their lobe) -> one record with a list of nodules."""
    n = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
    nodules = []
    for _ in range(n):
        want = int(round(4 + 21 * rng.beta(1.2, 3.0)))
        for lobe in [_pick_lobe(rng) for _ in range(4)]:
            region = _lobe_mask(ph, lobe) & ~busy
            room = _max_inner_distance(ph.grid, region)
            d = min(want, int(np.floor(2 * (room - 1.0))))
            if d < 4:
                continue
            fit = _fit_centre(ph.grid, region, d / 2 + 1.0, rng)
            if fit is None:
                continue
            k, _ = fit
            sh = _sphere(ph.grid, k, d / 2)
            box, m = sh
            m = np.broadcast_to(m, region[box].shape) & region[box]
            hu[box][m] = NODULE_HU
            lesion[box] |= m
            margin = _sphere(ph.grid, k, d / 2 + 2.0)
            busy[margin[0]] |= np.broadcast_to(margin[1], busy[margin[0]].shape)
            nodules.append({"lobe": lobe, "side": side_of_lobe(lobe), "size_mm": d,
                            "centre_voxel": [int(v) for v in k]})
            break
    if not nodules:
        return None
    return {"class": "Lung nodule", "nodules": nodules, "count": len(nodules)}


def _spots(hu: np.ndarray, ph: Phantom, centres: list[np.ndarray], radius: float, label: int,
           value: float) -> list[list[int]]:
    placed = []
    for c in centres:
        sh = ellipsoid(ph.grid, c, np.array([radius, radius, radius]))
        if sh is None:
            continue
        box, m = sh
        m = np.broadcast_to(m, hu[box].shape) & (ph.labels[box] == label)
        if m.any():
            hu[box][m] = value
            placed.append(ph.grid.voxel(c))
    return placed


def plant_arterial_calcification(ph: Phantom, hu: np.ndarray, rng: np.random.Generator) -> Finding | None:
    path = ph.aorta_path
    centres = []
    for _ in range(int(rng.integers(3, 9))):
        i = int(rng.integers(len(path) - 1))
        a, b = path[i], path[i + 1]
        p = a + rng.uniform() * (b - a)
        tang = (b - a) / (np.linalg.norm(b - a) + 1e-9)
        perp = np.cross(tang, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        centres.append(p + perp * ph.aorta_radius * 0.75)
    placed = _spots(hu, ph, centres, rng.uniform(1.6, 2.2), L_AORTA, CALCIFIC_HU)
    if not placed:
        return None
    return {"class": "Arterial wall calcification", "location": "thoracic aorta", "n_spots": len(placed),
            "centre_voxels": placed}


def plant_coronary_calcification(ph: Phantom, hu: np.ndarray, rng: np.random.Generator) -> Finding | None:
    centres = []
    for _ in range(int(rng.integers(2, 6))):
        n = np.array([0.35, -0.8, 0.15]) + rng.normal(0, 0.25, 3)
        n /= np.linalg.norm(n)
        centres.append(ph.heart_centre + n * ph.heart_semi * 0.9)
    placed = _spots(hu, ph, centres, rng.uniform(1.5, 2.0), L_MYO, CALCIFIC_HU - 150)
    if not placed:
        return None
    return {"class": "Coronary artery wall calcification", "n_spots": len(placed), "centre_voxels": placed}


def plant_kidney_cyst(ph: Phantom, hu: np.ndarray, lesion: np.ndarray, side_masks: dict[str, np.ndarray],
                      rng: np.random.Generator) -> Finding | None:
    for side in rng.permutation(["left", "right"]):
        side = str(side)
        kidney = ph.labels == (L_KID_L if side == "left" else L_KID_R)
        room = _max_inner_distance(ph.grid, kidney)
        d = min(int(rng.integers(5, 15)), int(np.floor(2 * (room - 1.0))))
        if d < 4:
            continue
        fit = _fit_centre(ph.grid, kidney, d / 2 + 1.0, rng)
        if fit is None:
            continue
        k, _ = fit
        box, m = _sphere(ph.grid, k, d / 2)
        m = np.broadcast_to(m, kidney[box].shape) & kidney[box]
        hu[box][m] = CYST_HU
        lesion[box] |= m
        side_masks[side][box] |= m
        return {"class": "Kidney cyst", "side": side, "size_mm": d, "centre_voxel": [int(v) for v in k]}
    return None


def cardiothoracic_ratio(ph: Phantom) -> float:
    heart = np.isin(ph.labels, (L_MYO, 21, 22, 23, 24))
    cols = np.nonzero(heart.any(axis=(0, 1)))[0]
    if not len(cols):
        return 0.0
    width = (cols.max() - cols.min() + 1) * ph.grid.spacing[0]
    return round(float(width / (2 * ph.cavity_half_width)), 3)
