"""Seeded synthetic chest-CT cohort in RadGenome-Chest CT's on-disk layout (the demo's dataset).

Layout under `out_dir` (written to a hidden sibling folder, renamed into place only when complete):
  volumes/<prefix>_<pid>/<prefix>_<pid><scan>/<prefix>_<pid>_<scan>_<recon>.nii.gz   int16 HU
  masks/seg_<volume_id>/<name>.nii.gz       one uint8 mask per RadGenome name (MASK_NAMES), CT grid
  reports.csv        CT-RATE: VolumeName, ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN
  region_report.csv  RadGenome: Volumename, Anatomy, Sentence (first row per volume: whole findings)
  labels.csv         VolumeName + CTRATE_CLASSES (0/1), exactly the planted classes
  splits.csv         VolumeName, patient_id, split (train / validation / test, by patient)
  planted.json       volume_id -> {split, patient_id, spacing, shape, cardiothoracic_ratio, findings:
                     [{class, lobe/side, size_mm, centre_voxel (z, y, x) ...}], sentences: [...]}

Train/validation patients use the `train` prefix and test patients `valid` (as CT-RATE). Same seed ->
byte-identical CSV/JSON and identical voxels (each case is seeded by (seed, patient, scan) alone, so
the worker count does not matter).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from pipeline.constants import CTRATE_CLASSES
from pipeline.demo import findings as fnd
from pipeline.demo.phantom import (
    BONE_LABELS,
    L_AORTA,
    L_BRONCHI,
    L_ESOPH,
    L_KID_L,
    L_KID_R,
    L_LA,
    L_LIVER,
    L_LLL,
    L_LUL,
    L_LV,
    L_MED,
    L_MYO,
    L_PA,
    L_PLEURAL,
    L_RA,
    L_RIB_L,
    L_RIB_R,
    L_RLL,
    L_RML,
    L_RUL,
    L_RV,
    L_SPLEEN,
    L_STERNUM,
    L_STOMACH,
    L_SVC,
    L_TRACHEA,
    L_VERT,
    Grid,
    base_intensity,
    build_phantom,
    sample_anatomy_params,
    smooth_field,
)
from pipeline.demo.report_text import compose_report
from pipeline.io import atomic_output
from pipeline.stage_config import SettingsError, settings_from_cli

REPORT_COLUMNS = ("VolumeName", "ClinicalInformation_EN", "Technique_EN", "Findings_EN", "Impressions_EN")
LESION_MASKS = ("lung nodule", "lung effusion", "kidney cyst", "left kidney cyst", "right kidney cyst")

# RadGenome (SAT) structure name -> leaf labels whose union it is. Lesion masks are drawn separately.
MASK_LABELS: dict[str, tuple[int, ...]] = {
    "lung": (L_RUL, L_RML, L_RLL, L_LUL, L_LLL),
    "right lung": (L_RUL, L_RML, L_RLL),
    "left lung": (L_LUL, L_LLL),
    "lung upper lobe": (L_RUL, L_LUL),
    "lung lower lobe": (L_RLL, L_LLL),
    "right lung upper lobe": (L_RUL,),
    "right lung middle lobe": (L_RML,),
    "right lung lower lobe": (L_RLL,),
    "left lung upper lobe": (L_LUL,),
    "left lung lower lobe": (L_LLL,),
    "trachea": (L_TRACHEA,),
    "bronchie": (L_BRONCHI,),
    "heart": (L_MYO, L_LA, L_RA, L_LV, L_RV),
    "heart atrium": (L_LA, L_RA),
    "heart ventricle": (L_LV, L_RV),
    "left heart atrium": (L_LA,),
    "right heart atrium": (L_RA,),
    "left heart ventricle": (L_LV,),
    "right heart ventricle": (L_RV,),
    "myocardium": (L_MYO,),
    "aorta": (L_AORTA,),
    "pulmonary artery": (L_PA,),
    "superior vena cava": (L_SVC,),
    "esophagus": (L_ESOPH,),
    "mediastinal tissue": (L_MED,),
    "bone": BONE_LABELS,
    "rib": (L_RIB_L, L_RIB_R),
    "left rib": (L_RIB_L,),
    "right rib": (L_RIB_R,),
    "vertebrae": (L_VERT,),
    "thoracic vertebrae": (L_VERT,),
    "sternum": (L_STERNUM,),
    "liver": (L_LIVER,),
    "spleen": (L_SPLEEN,),
    "stomach": (L_STOMACH,),
    "kidney": (L_KID_L, L_KID_R),
    "left kidney": (L_KID_L,),
    "right kidney": (L_KID_R,),
}
MASK_NAMES: tuple[str, ...] = tuple(MASK_LABELS) + LESION_MASKS
RADGENOME_ONLY = ("Kidney cyst",)  # planted classes that are not CT-RATE label columns


@dataclass(frozen=True)
class CaseSpec:
    volume_id: str
    patient_id: str
    split: str
    patient_serial: int
    scan_index: int
    seed: int
    shape: tuple[int, int, int]           # (z, y, x)
    spacing: tuple[float, float, float]   # nominal (x, y, z) mm
    findings: tuple[tuple[str, float], ...] | None = None  # (kind, weight) planted; None: all kinds
    normal_fraction: float = fnd.NORMAL_FRACTION

    @property
    def rel_ct(self) -> Path:
        prefix, pid, scan, _ = self.volume_id.split("_")
        patient = f"{prefix}_{pid}"
        return Path("volumes") / patient / f"{patient}{scan}" / f"{self.volume_id}.nii.gz"


# ---- cohort plan ----------------------------------------------------------------------------------

def finding_weights(findings: Sequence[str] | Mapping[str, float | None] | None
                    ) -> tuple[tuple[str, float], ...] | None:
    """Kinds to plant -> ((kind, weight), ...) in FINDING_WEIGHTS order; a bare list (or a weight of
    None) keeps the kind's own weight. None: every kind. An unknown kind or a weight <= 0 is refused
    with the list of known kinds."""
    if findings is None:
        return None
    chosen = dict(findings) if isinstance(findings, Mapping) else dict.fromkeys(findings)
    unknown = sorted(k for k in chosen if k not in fnd.FINDING_WEIGHTS)
    if unknown or not chosen:
        raise ValueError(f"demo findings {unknown or '[]'}: choose from {list(fnd.FINDING_WEIGHTS)}")
    weights = {k: fnd.FINDING_WEIGHTS[k] if w is None else float(w) for k, w in chosen.items()}
    bad = [k for k, w in weights.items() if not w > 0]
    if bad:
        raise ValueError(f"demo finding weights must be > 0: {bad}")
    return tuple((k, weights[k]) for k in fnd.FINDING_WEIGHTS if k in weights)


def plan_cohort(n_cases: int, seed: int, shape_xy: int, n_slices: int,
                spacing: tuple[float, float, float],
                findings: Sequence[str] | Mapping[str, float | None] | None = None,
                normal_fraction: float = fnd.NORMAL_FRACTION) -> list[CaseSpec]:
    """Patients (some with two scans), their splits (~70/15/15 by patient) and CT-RATE style ids."""
    if n_cases < 3:
        raise ValueError("n_cases must be >= 3 (one patient per split)")
    if not 0.0 <= normal_fraction < 1.0:
        raise ValueError(f"normal_fraction must be in [0, 1), got {normal_fraction}")
    planted = finding_weights(findings)
    rng = np.random.default_rng([seed, 7919])
    scans: list[int] = []
    while sum(scans) < n_cases:
        left = n_cases - sum(scans)
        scans.append(2 if left >= 2 and rng.random() < 0.15 else 1)
    if len(scans) < 3:  # tiny cohorts: one scan per patient so every split gets a patient
        scans = [1] * n_cases
    n_pat = len(scans)
    n_test = max(1, int(round(0.15 * n_pat)))
    n_val = max(1, int(round(0.15 * n_pat)))
    order = rng.permutation(n_pat)
    split_of = {int(p): "test" for p in order[:n_test]}
    split_of.update({int(p): "validation" for p in order[n_test:n_test + n_val]})
    counters = {"train": 0, "valid": 0}
    specs = []
    for p in range(n_pat):
        split = split_of.get(p, "train")
        prefix = "valid" if split == "test" else "train"
        counters[prefix] += 1
        pid = f"{prefix}_{counters[prefix]}"
        for k in range(scans[p]):
            scan = "ab"[k]
            specs.append(CaseSpec(f"{pid}_{scan}_1", pid, split, p, k, seed, (n_slices, shape_xy, shape_xy),
                                  tuple(float(v) for v in spacing), planted, float(normal_fraction)))
    return specs


# ---- one case -------------------------------------------------------------------------------------

def _write_image(image: sitk.Image, path: Path) -> None:
    sitk.WriteImage(image, str(path), useCompression=True)


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return round(float(obj), 4)
    return obj


def synthesize_case(spec: CaseSpec, exact_spacing: bool = False
                    ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any], Grid, tuple]:
    """-> (int16 HU array, mask name -> bool array, metadata record, grid, origin).

    The voxel spacing varies a few percent around `spec.spacing` from case to case, unless
    `exact_spacing` (the RadGenome-scale case: exactly RadGenome's 1 x 1 x 3 mm).
    """
    prng = np.random.default_rng([spec.seed, spec.patient_serial, 1])        # patient: anatomy
    rng = np.random.default_rng([spec.seed, spec.patient_serial, 2, spec.scan_index])  # this scan
    params = sample_anatomy_params(prng)
    sx, _, sz = spec.spacing
    sxy = round(sx * rng.uniform(0.93, 1.10), 3)
    szz = round(sz * rng.uniform(0.92, 1.08), 3)
    if exact_spacing:
        sxy, szz = float(sx), float(sz)
    grid = Grid(spec.shape, (sxy, sxy, szz))
    s = 0.5 * spec.shape[2] * sx * 0.95                     # body scale from the nominal field of view

    kinds = fnd.plan_findings(rng, None if spec.findings is None else dict(spec.findings), spec.normal_fraction)
    heart_scale = float(rng.uniform(1.25, 1.40)) if "Cardiomegaly" in kinds else 1.0
    peri_mm = int(rng.integers(3, 8)) if "Pericardial effusion" in kinds else 0
    ph = build_phantom(grid, s, params, rng, heart_scale=heart_scale, pericardial_mm=float(peri_mm),
                       hiatal_hernia="Hiatal hernia" in kinds)
    field = smooth_field(rng, grid.shape, (0.7, 2.0, 2.0))

    records: list[dict[str, Any]] = []
    overrides = []
    if "Pleural effusion" in kinds and (rec := fnd.plant_pleural_effusion(ph, rng)):
        records.append(rec)
    if "Lymphadenopathy" in kinds and (res := fnd.plant_lymphadenopathy(ph, rng)):
        records.append(res[0])
        overrides = res[1]

    hu = base_intensity(ph, field)
    for box, m in overrides:
        hu[box][m] = fnd.NODE_HU
    busy = np.zeros(grid.shape, bool)
    nodule = np.zeros(grid.shape, bool)
    cyst = np.zeros(grid.shape, bool)
    cyst_side = {"left": np.zeros(grid.shape, bool), "right": np.zeros(grid.shape, bool)}
    for kind in kinds:
        rec = None
        if kind == "Cardiomegaly":
            rec = {"class": kind, "heart_scale": heart_scale}
        elif kind == "Pericardial effusion":
            rec = {"class": kind, "thickness_mm": peri_mm}
        elif kind == "Hiatal hernia":
            rec = {"class": kind, "type": "sliding"}
        elif kind == "Emphysema":
            rec = fnd.plant_emphysema(ph, hu, field, rng)
        elif kind in ("Consolidation", "Lung opacity"):
            rec = fnd.plant_lung_patch(kind, ph, hu, field, busy, rng)
        elif kind == "Atelectasis":
            rec = fnd.plant_atelectasis(ph, hu, busy, rng)
        elif kind == "Arterial wall calcification":
            rec = fnd.plant_arterial_calcification(ph, hu, rng)
        elif kind == "Coronary artery wall calcification":
            rec = fnd.plant_coronary_calcification(ph, hu, rng)
        elif kind == "Kidney cyst":
            rec = fnd.plant_kidney_cyst(ph, hu, cyst, cyst_side, rng)
        elif kind == "Lung nodule":
            rec = fnd.plant_nodules(ph, hu, busy, nodule, rng)
        if rec is not None:
            records.append(rec)
    order = {k: i for i, k in enumerate(fnd.FINDING_WEIGHTS)}
    records.sort(key=lambda r: order[r["class"]])

    # partial volume, noise, int16
    hu = ndimage.gaussian_filter(hu, sigma=(0.3, 0.55, 0.55))
    hu += rng.normal(0.0, rng.uniform(10.0, 18.0), size=hu.shape).astype(np.float32)
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    masks: dict[str, np.ndarray] = {name: np.isin(ph.labels, labs) for name, labs in MASK_LABELS.items()}
    masks.update({"lung nodule": nodule, "lung effusion": ph.labels == L_PLEURAL, "kidney cyst": cyst,
                  "left kidney cyst": cyst_side["left"], "right kidney cyst": cyst_side["right"]})

    report = compose_report(records, rng, grid.spacing[2])
    origin = (round(-(spec.shape[2] - 1) / 2 * sxy, 3),
              round(-(spec.shape[1] - 1) / 2 * sxy + rng.uniform(-8, 8), 3),
              round(-float(rng.uniform(120.0, 260.0)), 3))
    meta = {
        "volume_id": spec.volume_id,
        "patient_id": spec.patient_id,
        "split": spec.split,
        "shape_zyx": list(spec.shape),
        "spacing_xyz": list(grid.spacing),
        "normal": not records,
        "cardiothoracic_ratio": fnd.cardiothoracic_ratio(ph),
        "findings": _json_ready(records),
        "sentences": [{"region": x.region, "anatomy": x.anatomy, "text": x.text} for x in report.sentences],
        "report": {"ClinicalInformation_EN": report.clinical, "Technique_EN": report.technique,
                   "Findings_EN": report.findings, "Impressions_EN": report.impressions},
    }
    return ct, masks, meta, grid, origin


def write_case(spec: CaseSpec, root: Path) -> dict[str, Any]:
    ct, masks, meta, grid, origin = synthesize_case(spec)
    ct_img = sitk.GetImageFromArray(ct)
    ct_img.SetSpacing(grid.spacing)
    ct_img.SetOrigin(origin)
    ct_img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    ct_path = root / spec.rel_ct
    ct_path.parent.mkdir(parents=True, exist_ok=True)
    _write_image(ct_img, ct_path)
    mdir = root / "masks" / f"seg_{spec.volume_id}"
    mdir.mkdir(parents=True, exist_ok=True)
    for name in MASK_NAMES:
        img = sitk.GetImageFromArray(masks[name].astype(np.uint8))
        img.CopyInformation(ct_img)
        _write_image(img, mdir / f"{name}.nii.gz")
    meta["origin_xyz"] = list(origin)
    return meta


def _write_case_star(args: tuple[CaseSpec, Path]) -> dict[str, Any]:
    return write_case(*args)


# ---- tables ---------------------------------------------------------------------------------------

def _write_csv(df: pd.DataFrame, path: Path) -> None:
    df.to_csv(path, index=False, lineterminator="\n")


def write_tables(metas: list[dict[str, Any]], root: Path) -> None:
    reports = pd.DataFrame([{"VolumeName": m["volume_id"], **m["report"]} for m in metas],
                           columns=list(REPORT_COLUMNS))
    _write_csv(reports, root / "reports.csv")
    rows = []
    for m in metas:
        rows.append({"Volumename": m["volume_id"], "Anatomy": "", "Sentence": m["report"]["Findings_EN"]})
        rows += [{"Volumename": m["volume_id"], "Anatomy": s["anatomy"], "Sentence": s["text"]}
                 for s in m["sentences"]]
    _write_csv(pd.DataFrame(rows, columns=["Volumename", "Anatomy", "Sentence"]), root / "region_report.csv")
    labels = []
    for m in metas:
        present = {f["class"] for f in m["findings"]}
        unknown = present - set(CTRATE_CLASSES) - set(RADGENOME_ONLY)
        if unknown:
            raise ValueError(f"{m['volume_id']}: planted classes outside CT-RATE's labels: {sorted(unknown)}")
        labels.append({"VolumeName": m["volume_id"], **{c: int(c in present) for c in CTRATE_CLASSES}})
    _write_csv(pd.DataFrame(labels, columns=["VolumeName", *CTRATE_CLASSES]), root / "labels.csv")
    splits = pd.DataFrame([{"VolumeName": m["volume_id"], "patient_id": m["patient_id"], "split": m["split"]}
                           for m in metas])
    _write_csv(splits, root / "splits.csv")
    planted = {m["volume_id"]: {k: v for k, v in m.items() if k not in ("volume_id", "report")}
               for m in metas}
    (root / "planted.json").write_text(json.dumps(planted, indent=1, sort_keys=True) + "\n", encoding="utf-8")


# ---- driver ---------------------------------------------------------------------------------------

def generate_demo_cohort(out_dir: Path, n_cases: int = 80, seed: int = 0, shape_xy: int = 112,
                         n_slices: int = 48, spacing: tuple[float, float, float] = (0.9, 0.9, 2.75),
                         workers: int | None = None,
                         verbose: bool = False,
                         findings: Sequence[str] | Mapping[str, float | None] | None = None,
                         normal_fraction: float = fnd.NORMAL_FRACTION) -> None:
    """Generate the cohort into `out_dir` atomically (an existing `out_dir` is replaced).

    `findings`: the kinds to plant (a list, or kind -> weight); None plants every kind."""
    out_dir = Path(out_dir)
    if not 32 <= shape_xy <= 512 or not 16 <= n_slices <= 512:
        raise ValueError(f"unsupported grid {n_slices} x {shape_xy} x {shape_xy}")
    specs = plan_cohort(n_cases, seed, shape_xy, n_slices, spacing, findings, normal_fraction)
    workers = max(1, min(workers or min(2, os.cpu_count() or 1), len(specs)))
    t0 = time.perf_counter()
    with atomic_output(out_dir) as tmp:
        tmp.mkdir()
        metas: list[dict[str, Any]] = []
        tasks = [(spec, tmp) for spec in specs]
        if workers == 1:
            results = map(_write_case_star, tasks)
            pool = None
        else:
            pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers)
            results = pool.imap(_write_case_star, tasks, chunksize=1)
        try:
            for i, meta in enumerate(results, 1):
                metas.append(meta)
                if verbose and (i % 10 == 0 or i == len(specs)):
                    print(f"[demo_cohort] {i}/{len(specs)} volumes ({time.perf_counter() - t0:.1f} s)",
                          flush=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        write_tables(metas, tmp)
    if verbose:
        print(f"[demo_cohort] wrote {len(specs)} volumes to {out_dir} in {time.perf_counter() - t0:.1f} s",
              flush=True)


@dataclass(frozen=True)
class DemoCohortSettings:
    """The generator's settings: the config's `dataset.demo` section.

    `findings`: finding kinds to plant, a list or kind -> weight (None: all, at their own weights);
    `normal_fraction`: share of cases with no finding (None: the generator's own, 0.3).
    """

    n_cases: int = 80
    seed: int = 0
    findings: list[str] | dict[str, float] | None = None
    normal_fraction: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.findings, dict):
            for kind, weight in self.findings.items():
                if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                    raise SettingsError(f"dataset.demo.findings: the weight of {kind!r} must be a number, "
                                        f"got {weight!r}")


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.demo_cohort", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (replaced atomically)")
    ap.add_argument("--params-json", default="{}",
                    help='DemoCohortSettings as JSON (the `dataset.demo` section), e.g. \'{"n_cases": 80, "seed": 0, '
                         '"findings": {"Lung nodule": 2}}\'; finding kinds: ' + ", ".join(fnd.FINDING_WEIGHTS))
    ap.add_argument("--shape-xy", type=int, default=112, help="in-plane size of every volume (voxels)")
    ap.add_argument("--n-slices", type=int, default=48, help="slices per volume")
    ap.add_argument("--spacing", type=float, nargs=3, default=(0.9, 0.9, 2.75), metavar=("X", "Y", "Z"),
                    help="voxel spacing in mm")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: min(2, cpus))")
    ap.add_argument("--radgenome-scale", action="store_true",
                    help="instead: one RadGenome-size volume (360 x 300 x 110 at 1 x 1 x 3 mm) with all 210 "
                         "structure files (pipeline.demo.radgenome_scale)")
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, DemoCohortSettings, args.params_json, section="dataset.demo")
    if args.radgenome_scale:
        from pipeline.demo.radgenome_scale import write_radgenome_scale_case

        write_radgenome_scale_case(args.out, settings.seed)
        print(f"[demo_cohort] wrote the RadGenome-scale case to {args.out}", flush=True)
        return
    normal_fraction = fnd.NORMAL_FRACTION if settings.normal_fraction is None else float(settings.normal_fraction)
    findings = settings.findings
    if isinstance(findings, dict):
        findings = {kind: float(weight) for kind, weight in findings.items()}
    generate_demo_cohort(args.out, settings.n_cases, settings.seed, args.shape_xy, args.n_slices, tuple(args.spacing),
                         workers=args.workers, verbose=True, findings=findings, normal_fraction=normal_fraction)
