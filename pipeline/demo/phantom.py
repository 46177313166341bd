"""Synthetic chest-CT anatomy: a leaf label map on a CT grid, built from seeded primitives.

Coordinates are millimetres in a case-centred frame that follows SimpleITK's LPS axes with an identity
direction: x grows to the patient's left, y to posterior, z to superior (z = 0 at the lowest slice).
Arrays are indexed (z, y, x). In-plane sizes are fractions of `s` (half the body-size scale in mm);
heights are fractions `t` of the volume's z extent, so any grid shape/spacing gives a plausible chest
(a miniature one at the demo's default ~100 mm field of view).

Every voxel carries exactly one leaf label (`L_*`); the RadGenome masks, including the overlapping
hierarchy (lung = lobes, heart = chambers + myocardium, ...), are unions of leaf labels (see
`pipeline.demo.cohort.MASK_LABELS`). Vessel trees and airway / gastric air live in separate boolean
volumes: they change intensities, not labels (SAT lobe masks include the lung vessels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

# ---- leaf labels ---------------------------------------------------------------------------------
L_AIR, L_FAT, L_MUSCLE, L_MED, L_ABD = 0, 1, 2, 3, 4
L_RUL, L_RML, L_RLL, L_LUL, L_LLL = 10, 11, 12, 13, 14
L_TRACHEA, L_BRONCHI = 15, 16
L_MYO, L_LA, L_RA, L_LV, L_RV = 20, 21, 22, 23, 24
L_AORTA, L_PA, L_SVC, L_ESOPH, L_PERICARD = 25, 26, 27, 28, 29
L_RIB_L, L_RIB_R, L_VERT, L_STERNUM, L_CANAL, L_DISC = 30, 31, 32, 33, 34, 35
L_LIVER, L_SPLEEN, L_KID_L, L_KID_R, L_STOMACH = 40, 41, 42, 43, 44
L_PLEURAL = 50

# keys are pipeline.constants.LOBES
LOBE_LABEL: dict[str, int] = {
    "right_upper_lobe": L_RUL,
    "right_middle_lobe": L_RML,
    "right_lower_lobe": L_RLL,
    "left_upper_lobe": L_LUL,
    "left_lower_lobe": L_LLL,
}
LUNG_LABELS: tuple[int, ...] = tuple(LOBE_LABEL.values())
BONE_LABELS: tuple[int, ...] = (L_RIB_L, L_RIB_R, L_VERT, L_STERNUM)

# Base attenuation (HU) per leaf label; texture, vessels, air and findings are added on top.
BASE_HU: dict[int, float] = {
    L_AIR: -1000, L_FAT: -100, L_MUSCLE: 45, L_MED: -85, L_ABD: -40,
    L_RUL: -855, L_RML: -855, L_RLL: -855, L_LUL: -855, L_LLL: -855,
    L_TRACHEA: 50, L_BRONCHI: 50,
    L_MYO: 45, L_LA: 38, L_RA: 38, L_LV: 38, L_RV: 38,
    L_AORTA: 42, L_PA: 38, L_SVC: 36, L_ESOPH: 40, L_PERICARD: 10,
    L_RIB_L: 300, L_RIB_R: 300, L_VERT: 250, L_STERNUM: 260, L_CANAL: 15, L_DISC: 85,
    L_LIVER: 60, L_SPLEEN: 50, L_KID_L: 33, L_KID_R: 33, L_STOMACH: 20,
    L_PLEURAL: 10,
}
CORTICAL_HU = 850.0
VESSEL_HU = 40.0


@dataclass(frozen=True)
class Grid:
    """Voxel grid: `shape` in array order (z, y, x), `spacing` in SimpleITK order (x, y, z) mm."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def zext(self) -> float:
        return (self.shape[0] - 1) * self.spacing[2]

    def axis(self, dim: str, sl: slice = slice(None)) -> np.ndarray:
        """1-D mm coordinates of axis 'x' | 'y' | 'z' (x, y centred, z from 0)."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        if dim == "x":
            return ((np.arange(nx)[sl] - (nx - 1) / 2) * sx).astype(np.float32)
        if dim == "y":
            return ((np.arange(ny)[sl] - (ny - 1) / 2) * sy).astype(np.float32)
        return (np.arange(nz)[sl] * sz).astype(np.float32)

    def coords(self, box: tuple[slice, slice, slice] | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (Z, Y, X) mm coordinates of the whole grid or a box."""
        box = box or (slice(None), slice(None), slice(None))
        z = self.axis("z", box[0])[:, None, None]
        y = self.axis("y", box[1])[None, :, None]
        x = self.axis("x", box[2])[None, None, :]
        return z, y, x

    def to_index(self, p: np.ndarray) -> np.ndarray:
        """(x, y, z) mm -> fractional (k, j, i) index."""
        nz, ny, nx = self.shape
        sx, sy, sz = self.spacing
        return np.array([p[2] / sz, p[1] / sy + (ny - 1) / 2, p[0] / sx + (nx - 1) / 2])

    def voxel(self, p: np.ndarray) -> list[int]:
        """(x, y, z) mm -> nearest (k, j, i) voxel index, clipped into the grid."""
        idx = np.rint(self.to_index(p)).astype(int)
        return [int(np.clip(v, 0, n - 1)) for v, n in zip(idx, self.shape)]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index box covering the mm box [lo, hi] (x, y, z); None when it misses the grid."""
        a, b = self.to_index(np.asarray(lo, float)), self.to_index(np.asarray(hi, float))
        out = []
        for dim in range(3):
            start = int(np.floor(min(a[dim], b[dim])))
            stop = int(np.ceil(max(a[dim], b[dim]))) + 1
            start, stop = max(start, 0), min(stop, self.shape[dim])
            if start >= stop:
                return None
            out.append(slice(start, stop))
        return tuple(out)  # type: ignore[return-value]


Box = tuple[slice, slice, slice]


def ellipsoid(grid: Grid, c: np.ndarray, semi: np.ndarray) -> tuple[Box, np.ndarray] | None:
    """Axis-aligned ellipsoid (centre / semi-axes in mm, x y z) -> (box, mask inside the box)."""
    c, semi = np.asarray(c, float), np.asarray(semi, float)
    box = grid.box(c - semi, c + semi)
    if box is None:
        return None
    z, y, x = grid.coords(box)
    r2 = ((x - c[0]) / semi[0]) ** 2 + ((y - c[1]) / semi[1]) ** 2 + ((z - c[2]) / semi[2]) ** 2
    return box, r2 <= 1.0


def tube(grid: Grid, p0: np.ndarray, p1: np.ndarray, r0: float,
         r1: float | None = None) -> tuple[Box, np.ndarray] | None:
    """Capsule from p0 to p1 (mm, x y z) with radius tapering r0 -> r1."""
    r1 = r0 if r1 is None else r1
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    rmax = max(r0, r1)
    box = grid.box(np.minimum(p0, p1) - rmax, np.maximum(p0, p1) + rmax)
    if box is None:
        return None
    z, y, x = grid.coords(box)
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    t = ((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / dd
    t = np.clip(t, 0.0, 1.0)
    dist2 = (x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2 + (z - p0[2] - t * d[2]) ** 2
    r = r0 + (r1 - r0) * t
    return box, dist2 <= r * r


def paint(labels: np.ndarray, shape: tuple[Box, np.ndarray] | None, value: int,
          allowed: tuple[int, ...] | None = None) -> None:
    """Set `value` inside a (box, mask) shape, optionally only over `allowed` labels."""
    if shape is None:
        return
    box, m = shape
    sub = labels[box]
    m = np.broadcast_to(m, sub.shape)
    if allowed is not None:
        m = m & np.isin(sub, allowed)
    sub[m] = value


def mark(volume: np.ndarray, shape: tuple[Box, np.ndarray] | None) -> None:
    if shape is None:
        return
    box, m = shape
    sub = volume[box]
    sub |= np.broadcast_to(m, sub.shape)


def polyline(grid: Grid, pts: list[np.ndarray], radius: float | list[float]) -> list[tuple[Box, np.ndarray]]:
    radii = radius if isinstance(radius, list) else [radius] * len(pts)
    out = []
    for a, b, ra, rb in zip(pts[:-1], pts[1:], radii[:-1], radii[1:]):
        s = tube(grid, a, b, ra, rb)
        if s is not None:
            out.append(s)
    return out


# ---- per-patient anatomy parameters --------------------------------------------------------------

def sample_anatomy_params(rng: np.random.Generator) -> dict[str, float]:
    """Jitter of every size and position, drawn once per patient (scans of a patient share it)."""
    u = rng.uniform
    return {
        "body": u(0.93, 1.04), "body_bx": u(0.84, 0.92), "body_by": u(0.64, 0.72),
        "dome": u(0.26, 0.32), "fiss_f0": u(0.46, 0.54), "fiss_f1": u(0.22, 0.30), "fiss_h0": u(0.50, 0.57),
        "heart_x": u(0.07, 0.13), "heart_y": u(-0.17, -0.11), "heart_t": u(0.37, 0.43),
        "heart_size": u(0.92, 1.06),
        "carina_t": u(0.63, 0.69), "arch_t": u(0.78, 0.84), "spine_y": u(0.35, 0.39),
        "rib_period": u(5.8, 7.2), "rib_phase": u(0.0, 1.0),
        "vert_period": u(5.0, 6.2), "vert_phase": u(0.0, 1.0),
        "liver": u(0.94, 1.08), "spleen": u(0.85, 1.15), "kidney": u(0.92, 1.08), "kidney_t": u(0.02, 0.07),
        "vessel_seed": float(rng.integers(0, 2**31 - 1)),
    }


@dataclass
class Phantom:
    grid: Grid
    s: float                                    # in-plane size scale (mm)
    labels: np.ndarray                          # uint8 leaf labels (z, y, x)
    vessels: np.ndarray                         # bool, lung vessel tree (HU only inside lobes)
    air: np.ndarray                             # bool, airway lumen / gastric air
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)   # mm (x, y, z)
    aorta_path: list[np.ndarray] = field(default_factory=list)
    aorta_radius: float = 0.0
    heart_centre: np.ndarray = field(default_factory=lambda: np.zeros(3))
    heart_semi: np.ndarray = field(default_factory=lambda: np.ones(3))
    cavity_half_width: float = 0.0             # mm, inner thoracic half-width (for the CT ratio)


def _taper(t: np.ndarray) -> np.ndarray:
    """In-plane scale of the thoracic cavity: 1 below mid-chest, narrowing to the apex."""
    return np.sqrt(np.clip(1.0 - np.clip((t - 0.5) / 0.56, 0.0, None) ** 4, 0.05, 1.0))


def _heart_labels(grid: Grid, c: np.ndarray, semi: np.ndarray) -> tuple[Box, np.ndarray] | None:
    """Heart ellipsoid split into myocardium and four chambers -> (box, uint8 labels, 0 outside)."""
    box = grid.box(c - semi, c + semi)
    if box is None:
        return None
    z, y, x = grid.coords(box)
    nx, ny, nz = (x - c[0]) / semi[0], (y - c[1]) / semi[1], (z - c[2]) / semi[2]
    r2 = nx**2 + ny**2 + nz**2
    inside, inner = r2 <= 1.0, r2 <= 0.80**2
    atria = (0.8 * ny + 0.5 * nz - 0.3 * nx) > 0.12           # posterior-superior base
    left_atrium = (nx + 0.6 * ny) > -0.05
    lr = nx + 0.5 * ny - 0.05                                  # interventricular plane
    out = np.zeros(np.broadcast_shapes(nx.shape, ny.shape, nz.shape), np.uint8)
    out[np.broadcast_to(inside, out.shape)] = L_MYO
    out[inner & atria & left_atrium] = L_LA
    out[inner & atria & ~left_atrium] = L_RA
    out[inner & ~atria & (lr > 0.07)] = L_LV
    out[inner & ~atria & (lr < -0.07)] = L_RV
    return box, out


def _vessel_tree(rng: np.random.Generator, start: np.ndarray, dirs: list[np.ndarray], length: float,
                 radius: float, generations: int = 4) -> list[tuple[np.ndarray, np.ndarray, float, float]]:
    segs = []
    stack = [(start, d / np.linalg.norm(d), length, radius, 0) for d in dirs]
    while stack:
        p, d, ln, r, g = stack.pop()
        q = p + d * ln
        segs.append((p, q, r, r * 0.8))
        if g + 1 >= generations:
            continue
        perp = np.cross(d, rng.normal(size=3))
        perp /= np.linalg.norm(perp) + 1e-9
        ang = rng.uniform(0.35, 0.7)
        for sgn in (1.0, -1.0):
            nd = d * np.cos(ang) + sgn * perp * np.sin(ang) + rng.normal(0, 0.08, 3)
            stack.append((q, nd / np.linalg.norm(nd), ln * rng.uniform(0.65, 0.85), r * 0.76, g + 1))
    return segs


def build_phantom(grid: Grid, s: float, p: dict[str, float], rng: np.random.Generator, *,
                  heart_scale: float = 1.0, pericardial_mm: float = 0.0,
                  hiatal_hernia: bool = False) -> Phantom:
    """Paint the leaf label map of one case (cardiomegaly / pericardial fluid / hernia are anatomy)."""
    nz, ny, nx = grid.shape
    zext = grid.zext
    s = s * p["body"]
    labels = np.zeros(grid.shape, np.uint8)
    vessels = np.zeros(grid.shape, bool)
    air = np.zeros(grid.shape, bool)
    Z, Y, X = grid.coords()
    T = Z / zext
    P = lambda x, y, t: np.array([x * s, y * s, t * zext], float)  # noqa: E731  (fractions -> mm)

    # body wall: subcutaneous fat, muscle, thoracic cavity
    bx, by = p["body_bx"] * s, p["body_by"] * s
    rho2 = (X / bx) ** 2 + (Y / by) ** 2                      # (1, ny, nx)
    labels[np.broadcast_to(rho2 <= 1.0, grid.shape)] = L_FAT
    labels[np.broadcast_to(rho2 <= 0.93**2, grid.shape)] = L_MUSCLE
    cbx, cby = 0.78 * bx, 0.78 * by
    taper = _taper(T)
    cavity = (X / (cbx * taper)) ** 2 + (Y / (cby * taper)) ** 2 <= 1.0
    dome = (p["dome"] + 0.03 / (1.0 + np.exp(X / 3.0)) - 0.10 * (Y / cby) - 0.10 * (X / cbx) ** 2)
    above = dome < T
    labels[cavity & above] = L_MED
    labels[cavity & ~above] = L_ABD

    # lungs: cavity above the diaphragm minus the mediastinal band and the paravertebral column
    ys = p["spine_y"] * s
    # mediastinal band: narrow anteriorly (anterior junction), widest at the hila
    band_w = 0.13 * s * (0.45 + 0.55 * np.clip(1.0 - ((Y + 0.05 * s) / cby) ** 2, 0.0, 1.0))
    band = np.abs(X - 0.02 * s) < band_w
    paraspinal = X**2 + (Y - ys) ** 2 < (0.19 * s) ** 2
    lung = cavity & above & ~band & ~paraspinal
    lower = p["fiss_f0"] + p["fiss_f1"] * (Y / cby) > T
    right = np.broadcast_to(X < 0, grid.shape)
    labels[lung & right & lower] = L_RLL
    labels[lung & right & ~lower & (p["fiss_h0"] > T)] = L_RML
    labels[lung & right & ~lower & (p["fiss_h0"] <= T)] = L_RUL
    labels[lung & ~right & lower] = L_LLL
    labels[lung & ~right & ~lower] = L_LUL

    # upper abdomen (only below the dome)
    abd = (L_ABD,)
    stomach_c = P(0.32, -0.12, 0.15)
    stomach_semi = np.array([0.24 * s, 0.22 * s, 0.13 * zext])
    st = ellipsoid(grid, stomach_c, stomach_semi)
    paint(labels, st, L_STOMACH, abd)
    if st is not None:
        box, m = st
        z, y, _ = grid.coords(box)
        mark(air, (box, m & (y < stomach_c[1] - 0.3 * stomach_semi[1]) & (z > stomach_c[2])))
    lv = p["liver"]
    paint(labels, ellipsoid(grid, P(-0.22, -0.05, 0.10), np.array([0.52 * s, 0.48 * s, 0.30 * zext]) * lv),
          L_LIVER, (L_ABD, L_STOMACH))
    sp = p["spleen"]
    paint(labels, ellipsoid(grid, P(0.48, 0.30, 0.17), np.array([0.16 * s, 0.20 * s, 0.12 * zext]) * sp),
          L_SPLEEN, (L_ABD, L_STOMACH, L_LIVER))
    kd = np.array([0.15 * s, 0.17 * s, 0.16 * zext]) * p["kidney"]
    kt = p["kidney_t"]
    for lab, xk, dt in ((L_KID_L, 0.30, 0.02), (L_KID_R, -0.30, 0.0)):
        paint(labels, ellipsoid(grid, P(xk, 0.36, kt + dt), kd), lab, (L_ABD, L_LIVER, L_SPLEEN, L_STOMACH))

    # heart (+ pericardial fluid rim), great vessels, esophagus, airways
    hc = P(p["heart_x"], p["heart_y"], p["heart_t"])
    zs = 1.0 + (heart_scale - 1.0) * 0.5
    hsemi = np.array([0.30 * s * heart_scale, 0.25 * s * heart_scale, 0.16 * zext * zs]) * p["heart_size"]
    soft = (L_MED, L_ABD, L_LIVER, L_STOMACH) + LUNG_LABELS
    if pericardial_mm > 0:
        paint(labels, ellipsoid(grid, hc, hsemi + pericardial_mm), L_PERICARD, soft)
    hl = _heart_labels(grid, hc, hsemi)
    if hl is not None:
        box, sub = hl
        tgt = labels[box]
        tgt[sub > 0] = sub[sub > 0]

    top = 1.05
    carina_t = p["carina_t"]
    ty = 0.06
    esoph = [P(0.03, 0.21, top), P(0.04, 0.20, 0.40), P(0.12, 0.08, 0.24), P(0.26, -0.04, 0.16)]
    for sh in polyline(grid, esoph, 0.05 * s):
        paint(labels, sh, L_ESOPH, soft + (L_PERICARD,))
    if hiatal_hernia:
        hh_c = P(0.07, 0.13, float(p["dome"]) + 0.08)
        hh_semi = np.array([0.13 * s, 0.11 * s, 0.07 * zext])
        hh = ellipsoid(grid, hh_c, hh_semi)
        paint(labels, hh, L_STOMACH, soft + (L_ESOPH, L_PERICARD))
        if hh is not None:
            box, m = hh
            _, y, _ = grid.coords(box)
            mark(air, (box, m & (y < hh_c[1] - 0.35 * hh_semi[1])))

    arch_t = p["arch_t"]
    root = hc + np.array([-0.08 * s, 0.02 * s, 0.55 * hsemi[2]])
    pa_root = hc + np.array([0.02 * s, -0.06 * s, 0.60 * hsemi[2]])
    svc_end = hc + np.array([-0.22 * s, 0.05 * s, 0.45 * hsemi[2]])
    vessel_ok = soft + (L_PERICARD, L_MYO, L_LA, L_RA, L_LV, L_RV, L_ESOPH, L_STOMACH, L_KID_L, L_KID_R,
                        L_SPLEEN)
    pa_split = P(0.08, -0.06, carina_t - 0.03)
    for sh in polyline(grid, [pa_root, pa_split], 0.075 * s):
        paint(labels, sh, L_PA, vessel_ok)
    hil_r = P(-0.22, 0.05, carina_t - 0.10)
    hil_l = P(0.22, 0.07, carina_t - 0.08)
    for sh in polyline(grid, [pa_split, P(-0.04, 0.0, carina_t - 0.03), hil_r + np.array([0, -0.03 * s, 0])],
                       0.055 * s) + polyline(grid, [pa_split, hil_l + np.array([0, -0.02 * s, 0.02 * zext])],
                                             0.055 * s):
        paint(labels, sh, L_PA, vessel_ok)
    for sh in polyline(grid, [P(-0.15, -0.02, top), svc_end], 0.05 * s):
        paint(labels, sh, L_SVC, vessel_ok + (L_PA,))
    aorta = [root, P(-0.02, -0.08, arch_t - 0.02), P(0.03, -0.02, arch_t + 0.03),
             P(0.10, 0.12, arch_t + 0.02), P(0.15, 0.24, arch_t - 0.04), P(0.15, 0.26, 0.30),
             P(0.07, 0.22, -0.05)]
    a_r = [0.085 * s, 0.085 * s, 0.08 * s, 0.075 * s, 0.072 * s, 0.072 * s, 0.068 * s]
    for sh in polyline(grid, aorta, a_r):
        paint(labels, sh, L_AORTA, vessel_ok + (L_PA, L_SVC, L_LIVER))

    # trachea, main and lobar bronchi (wall + air lumen)
    carina = P(-0.01, ty, carina_t)
    airway = [(L_TRACHEA, [P(0.0, ty, top), carina], 0.095 * s)]
    lobar_r = 0.04 * s
    airway += [(L_BRONCHI, [carina, hil_r], 0.065 * s), (L_BRONCHI, [carina, hil_l], 0.06 * s)]
    for dst in (P(-0.30, 0.02, carina_t + 0.04), P(-0.33, -0.14, carina_t - 0.18),
                P(-0.28, 0.20, carina_t - 0.26)):
        airway.append((L_BRONCHI, [hil_r, dst], lobar_r))
    for dst in (P(0.31, -0.04, carina_t + 0.02), P(0.29, 0.20, carina_t - 0.24)):
        airway.append((L_BRONCHI, [hil_l, dst], lobar_r))
    for lab, pts, r in airway:
        wall = max(0.8, 0.22 * r)
        for sh in polyline(grid, pts, r):
            paint(labels, sh, lab, vessel_ok + (L_PA, L_SVC, L_AORTA, L_TRACHEA, L_BRONCHI))
        for sh in polyline(grid, pts, r - wall):
            box, m = sh
            mark(air, (box, m & np.isin(labels[box], (L_TRACHEA, L_BRONCHI))))

    # lung vessel trees from the hila (HU only; the tree stays a lobe label)
    vrng = np.random.default_rng(int(p["vessel_seed"]))
    for hil, sx in ((hil_r, -1.0), (hil_l, 1.0)):
        dirs = [np.array([sx * vrng.uniform(0.2, 0.8), vrng.uniform(-0.9, 0.9), vrng.uniform(-1.0, 1.0)])
                for _ in range(10)]
        for a, b, r0, r1 in _vessel_tree(vrng, hil, dirs, 0.26 * s, 0.05 * s, generations=5):
            mark(vessels, tube(grid, a, b, r0, r1))

    # bones: ribs, vertebrae (discs between), spinal canal, sternum
    t_ok = (T > 0.08) & (T < 0.97)
    ring = (rho2 / taper**2 >= 0.79**2) & (rho2 / taper**2 <= 0.855**2)
    period = zext / p["rib_period"]
    band_z = np.mod((Z - 1.1 * Y) / period + p["rib_phase"], 1.0) < 0.38
    not_mid = ~((np.abs(X) < 0.16 * s) & (Y < 0)) & ~((np.abs(X) < 0.10 * s) & (Y > 0))
    ribs = ring & band_z & not_mid & t_ok
    labels[ribs & right] = L_RIB_R
    labels[ribs & ~right] = L_RIB_L

    vz = np.mod(Z / (zext / p["vert_period"]) + p["vert_phase"], 1.0)
    disc = vz < 0.18                                            # (nz, 1, 1)
    body = X**2 + (Y - ys) ** 2 <= (0.11 * s) ** 2
    cy = ys + 0.16 * s
    rc2 = X**2 + (Y - cy) ** 2
    canal = rc2 <= (0.045 * s) ** 2
    arch = (rc2 <= (0.085 * s) ** 2) & ~canal & (cy - 0.02 * s <= Y)
    spinous = (np.abs(X) < 0.022 * s) & (cy <= Y) & (cy + 0.15 * s >= Y)
    transverse = (np.abs(Y - cy + 0.01 * s) < 0.025 * s) & (np.abs(X) < 0.19 * s)
    post = arch | spinous | transverse
    labels[np.broadcast_to(body, grid.shape) & disc] = L_DISC
    labels[(body | post) & ~disc] = L_VERT
    labels[np.broadcast_to(canal, grid.shape)] = L_CANAL
    sternum = ((X / (0.085 * s)) ** 2 + ((Y + 0.59 * s) / (0.032 * s)) ** 2 <= 1.0) & (T > 0.38) & (T < 0.97)
    labels[sternum] = L_STERNUM

    return Phantom(
        grid=grid, s=s, labels=labels, vessels=vessels, air=air,
        landmarks={"carina": carina, "hilum_right": hil_r, "hilum_left": hil_l,
                   "trachea_top": P(0.0, ty, 1.0), "arch": aorta[3]},
        aorta_path=aorta[1:6], aorta_radius=0.075 * s, heart_centre=hc, heart_semi=hsemi,
        cavity_half_width=float(cbx),
    )


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int],
                 sigma: tuple[float, float, float]) -> np.ndarray:
    """Unit-variance smooth Gaussian random field (float32)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return f / (f.std() + 1e-6)


def base_intensity(ph: Phantom, field: np.ndarray) -> np.ndarray:
    """HU of the anatomy (before findings): label LUT, parenchyma gradient, vessels, air, cortical bone."""
    lut = np.zeros(256, np.float32)
    for lab, hu in BASE_HU.items():
        lut[lab] = hu
    labels = ph.labels
    hu = lut[labels]
    _, Y, _ = ph.grid.coords()
    lung = np.isin(labels, LUNG_LABELS)
    grad = np.broadcast_to(35.0 * Y / (0.5 * ph.s), labels.shape)  # dependent (posterior) lung denser
    hu[lung] += grad[lung] + 12.0 * field[lung]
    abd = labels == L_ABD
    hu[abd] += 45.0 * field[abd]
    med = labels == L_MED
    hu[med] += 10.0 * field[med]
    hu[ph.vessels & lung] = VESSEL_HU
    hu[ph.air & np.isin(labels, (L_TRACHEA, L_BRONCHI, L_STOMACH))] = -1000.0
    bone = np.isin(labels, BONE_LABELS)
    core = ndimage.binary_erosion(bone, structure=np.ones((1, 3, 3), bool))
    hu[bone & ~core] = CORTICAL_HU
    return hu
