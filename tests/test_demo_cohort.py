"""The demo cohort generator: RadGenome layout, CT-grid masks, realistic HU, planted findings that the
masks, labels and report text all agree on, patient splits, determinism and atomic output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from scipy import ndimage

from pipeline.constants import CTRATE_CLASSES, REGIONS, SPLITS
from pipeline.demo import cohort as demo
from pipeline.demo.report_text import LOBE_ALT, LOBE_MASK_NAME
from pipeline.demo_cohort import MASK_NAMES, generate_demo_cohort

# small grid, same physical size as the default (~100 mm field of view, ~125 mm tall)
GRID = {"shape_xy": 64, "n_slices": 32, "spacing": (1.6, 1.6, 4.0)}
N_CASES = 10
SEED = 8
VOLUME_RE = re.compile(r"^(?P<prefix>train|valid)_(?P<pid>\d+)_(?P<scan>[a-z])_(?P<recon>\d+)$")


def _gen(out: Path, seed: int = SEED, workers: int = 1, n_cases: int = N_CASES, **kw) -> Path:
    generate_demo_cohort(out, n_cases=n_cases, seed=seed, workers=workers, **GRID, **kw)
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return _gen(tmp_path_factory.mktemp("demo") / "cohort")


@pytest.fixture(scope="module")
def planted(cohort) -> dict:
    return json.loads((cohort / "planted.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reports(cohort) -> pd.DataFrame:
    return pd.read_csv(cohort / "reports.csv", dtype=str, keep_default_na=False)


def ct_path(root: Path, vid: str) -> Path:
    m = VOLUME_RE.match(vid)
    assert m, vid
    patient = f"{m['prefix']}_{m['pid']}"
    return root / "volumes" / patient / f"{patient}{m['scan']}" / f"{vid}.nii.gz"


def read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def mask(root: Path, vid: str, name: str) -> np.ndarray:
    return read(root / "masks" / f"seg_{vid}" / f"{name}.nii.gz").astype(bool)


def classes(rec: dict) -> set[str]:
    return {f["class"] for f in rec["findings"]}


def finding(rec: dict, cls: str) -> dict | None:
    return next((f for f in rec["findings"] if f["class"] == cls), None)


# ---- layout -------------------------------------------------------------------------------------

def test_layout_follows_radgenome(cohort, reports, planted):
    vids = list(reports["VolumeName"])
    assert len(vids) == N_CASES and len(set(vids)) == N_CASES
    assert list(reports.columns) == list(demo.REPORT_COLUMNS)
    assert set(planted) == set(vids)
    for vid in vids:
        assert ct_path(cohort, vid).is_file()
        names = sorted(p.name[: -len(".nii.gz")] for p in (cohort / "masks" / f"seg_{vid}").iterdir())
        assert names == sorted(MASK_NAMES), vid  # every case has every name, absent ones empty
    assert not [p for p in cohort.parent.iterdir() if p.name.startswith(".cohort.")]  # no temp left


def test_mask_names_are_radgenome_vocabulary(shared_data):
    vocab = {line.split("\t")[1].strip() for line in
             (shared_data / "label-maps" / "radgenome_anatomy_names.txt").read_text(encoding="utf-8").splitlines()
             if line and not line.startswith("#")}
    assert set(MASK_NAMES) <= vocab, sorted(set(MASK_NAMES) - vocab)


def test_ct_header_and_masks_on_ct_grid(cohort, reports):
    reader = sitk.ImageFileReader()
    for vid in reports["VolumeName"]:
        ct = sitk.ReadImage(str(ct_path(cohort, vid)))
        assert ct.GetPixelID() == sitk.sitkInt16
        assert ct.GetSize() == (GRID["shape_xy"], GRID["shape_xy"], GRID["n_slices"])
        assert np.allclose(ct.GetDirection(), np.eye(3).ravel())
        sx, sy, sz = ct.GetSpacing()
        assert sx == sy and 1.4 < sx < 1.8 and 3.6 < sz < 4.4
        for name in MASK_NAMES:
            reader.SetFileName(str(cohort / "masks" / f"seg_{vid}" / f"{name}.nii.gz"))
            reader.ReadImageInformation()
            assert reader.GetSize() == ct.GetSize(), (vid, name)
            assert np.allclose(reader.GetSpacing(), ct.GetSpacing()), (vid, name)
            assert np.allclose(reader.GetOrigin(), ct.GetOrigin()), (vid, name)
            assert np.allclose(reader.GetDirection(), ct.GetDirection()), (vid, name)
            assert reader.GetPixelID() == sitk.sitkUInt8


def test_mask_hierarchy_overlaps_like_radgenome(cohort, reports):
    vid = reports["VolumeName"][0]
    m = {n: mask(cohort, vid, n) for n in MASK_NAMES}
    lobes = ["right lung upper lobe", "right lung middle lobe", "right lung lower lobe",
             "left lung upper lobe", "left lung lower lobe"]
    assert all(m[n].any() for n in lobes)
    assert np.array_equal(m["lung"], np.logical_or.reduce([m[n] for n in lobes]))
    assert np.array_equal(m["right lung"], m["right lung upper lobe"] | m["right lung middle lobe"]
                          | m["right lung lower lobe"])
    chambers = ("left heart atrium", "right heart atrium", "left heart ventricle", "right heart ventricle")
    assert np.array_equal(m["heart"], np.logical_or.reduce([m[n] for n in chambers]) | m["myocardium"])
    assert np.array_equal(m["kidney"], m["left kidney"] | m["right kidney"])
    assert np.array_equal(m["rib"], m["left rib"] | m["right rib"])
    for n in ("trachea", "bronchie", "aorta", "pulmonary artery", "superior vena cava", "esophagus",
              "mediastinal tissue", "vertebrae", "sternum", "liver", "spleen", "left kidney", "right kidney"):
        assert m[n].any(), n
    assert not (m["lung"] & m["heart"]).any() and not (m["liver"] & m["lung"]).any()


# ---- intensities ------------------------------------------------------------------------------------

def test_hounsfield_units_are_realistic(cohort, reports):
    for vid in reports["VolumeName"]:
        ct = read(ct_path(cohort, vid)).astype(float)
        lung, liver = mask(cohort, vid, "lung"), mask(cohort, vid, "liver")
        bone = mask(cohort, vid, "rib") | mask(cohort, vid, "vertebrae") | mask(cohort, vid, "sternum")
        assert ct[lung].mean() < -600, vid
        assert 30 < ct[liver].mean() < 90, vid
        assert ct[bone].mean() > 150, vid
        assert ct[:, :3, :3].mean() < -950  # air outside the body
        heart = mask(cohort, vid, "heart")
        assert 15 < np.median(ct[heart]) < 70, vid


def test_lesion_masks_empty_exactly_when_not_planted(cohort, planted):
    for vid, rec in planted.items():
        c = classes(rec)
        assert mask(cohort, vid, "lung nodule").any() == ("Lung nodule" in c), vid
        assert mask(cohort, vid, "lung effusion").any() == ("Pleural effusion" in c), vid
        assert mask(cohort, vid, "kidney cyst").any() == ("Kidney cyst" in c), vid
        cyst = finding(rec, "Kidney cyst")
        for side in ("left", "right"):
            expect = cyst is not None and cyst["side"] == side
            assert mask(cohort, vid, f"{side} kidney cyst").any() == expect, (vid, side)
    assert any("Lung nodule" in classes(r) for r in planted.values()), "fixture seed should plant a nodule"


def test_planted_nodules_are_bright_and_in_their_lobe(cohort, planted):
    seen = 0
    for vid, rec in planted.items():
        f = finding(rec, "Lung nodule")
        if f is None:
            continue
        ct = read(ct_path(cohort, vid)).astype(float)
        nod = mask(cohort, vid, "lung nodule")
        lung = mask(cohort, vid, "lung")
        ring = ndimage.binary_dilation(nod, np.ones((1, 5, 5), bool)) & lung & ~nod
        assert ct[nod].mean() > ct[ring].mean() + 200, vid
        for n in f["nodules"]:
            k = tuple(n["centre_voxel"])
            assert nod[k] and mask(cohort, vid, LOBE_MASK_NAME[n["lobe"]])[k], (vid, n)
            assert 4 <= n["size_mm"] <= 25
            seen += 1
    assert seen


def test_effusion_is_fluid_outside_the_lung(cohort, planted):
    for vid, rec in planted.items():
        if finding(rec, "Pleural effusion") is None:
            continue
        eff = mask(cohort, vid, "lung effusion")
        ct = read(ct_path(cohort, vid)).astype(float)
        assert not (eff & mask(cohort, vid, "lung")).any()
        assert -30 < ct[eff].mean() < 60, vid


# ---- labels, text, region report, splits -------------------------------------------------------------

def test_labels_match_planted(cohort, planted):
    labels = pd.read_csv(cohort / "labels.csv")
    assert list(labels.columns) == ["VolumeName", *CTRATE_CLASSES]
    for row in labels.itertuples(index=False):
        rec = planted[row.VolumeName]
        for cls, val in zip(CTRATE_CLASSES, row[1:]):
            assert val == int(cls in classes(rec)), (row.VolumeName, cls)
        assert rec["normal"] == (not rec["findings"])


def test_every_normal_phrasing_labels_as_normal():
    """Each way the generator says "normal" must read as no finding to the evaluation labeler, or the
    demo's clinical F1 counts the phrasing, not the model ("lymph nodes are not enlarged" once did)."""
    from pipeline.demo.report_text import _NORMAL, _NORMAL_IMPRESSION
    from pipeline.evaluate.labeler import CLASSES, label_reports

    texts = [t for options in _NORMAL.values() for t in options] + _NORMAL_IMPRESSION
    labels = label_reports(texts)
    wrong = {t: [c for c, v in zip(CLASSES, row) if v] for t, row in zip(texts, labels) if row.any()}
    assert not wrong, wrong


def test_report_text_matches_planted_findings(planted, reports):
    text = dict(zip(reports["VolumeName"], reports["Findings_EN"]))
    for vid, rec in planted.items():
        sentences = re.split(r"(?<=\.)\s+", text[vid])
        f = finding(rec, "Lung nodule")
        nodule_sents = [s for s in sentences if re.search(r"\bnodule\b", s) and re.search(r"\d+ mm", s)]
        if f is None:
            assert not nodule_sents, vid
            continue
        for n in f["nodules"]:
            lobe = (LOBE_MASK_NAME[n["lobe"]], LOBE_ALT[n["lobe"]])
            size = f"{n['size_mm']} mm"
            assert any(size in s and any(lb in s for lb in lobe) for s in nodule_sents), (vid, n)
        eff = finding(rec, "Pleural effusion")
        if eff is not None:
            for side, d in eff["depth_mm"].items():
                assert f"{d} mm" in text[vid]
    for vid, rec in planted.items():
        if rec["normal"]:
            impression = reports.set_index("VolumeName").loc[vid, "Impressions_EN"]
            assert "normal limits" in impression or "No significant pathology" in impression


def test_region_report_rows(cohort, reports, planted, shared_data):
    rr = pd.read_csv(cohort / "region_report.csv", dtype=str, keep_default_na=False)
    assert list(rr.columns) == ["Volumename", "Anatomy", "Sentence"]
    observed = {ln.strip() for ln in (shared_data / "label-maps" / "radgenome_anatomy_paths_observed.txt")
                .read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")}
    findings = dict(zip(reports["VolumeName"], reports["Findings_EN"]))
    for vid, rows in rr.groupby("Volumename", sort=False):
        assert rows["Anatomy"].iloc[0] == "" and rows["Sentence"].iloc[0] == findings[vid]
        rest = rows.iloc[1:]
        assert (rest["Anatomy"] != "").all()
        assert " ".join(rest["Sentence"]) == findings[vid]
        assert set(rest["Anatomy"]) <= observed, set(rest["Anatomy"]) - observed
        regions = [s["region"] for s in planted[vid]["sentences"]]
        assert regions == sorted(regions, key=REGIONS.index)  # findings ordered lung .. abdomen


def test_splits_are_by_patient(cohort, reports):
    splits = pd.read_csv(cohort / "splits.csv", dtype=str)
    assert list(splits.columns) == ["VolumeName", "patient_id", "split"]
    assert set(splits["VolumeName"]) == set(reports["VolumeName"])
    assert set(splits["split"]) == set(SPLITS)
    assert (splits.groupby("patient_id")["split"].nunique() == 1).all()
    for row in splits.itertuples(index=False):
        m = VOLUME_RE.match(row.VolumeName)
        assert row.patient_id == f"{m['prefix']}_{m['pid']}"
        assert (m["prefix"] == "valid") == (row.split == "test")


def test_patients_with_two_scans_share_split():
    specs = demo.plan_cohort(80, 0, 64, 32, (1.6, 1.6, 4.0))
    by_patient: dict[str, set[str]] = {}
    for s in specs:
        by_patient.setdefault(s.patient_id, set()).add(s.split)
    assert len(specs) == 80
    assert any(s.volume_id.endswith("_b_1") for s in specs)
    assert all(len(v) == 1 for v in by_patient.values())
    assert 0.6 < sum(s.split == "train" for s in specs) / 80 < 0.8


def test_every_finding_class_appears_in_a_full_cohort_plan():
    from pipeline.demo.findings import FINDING_WEIGHTS, plan_findings

    counts = dict.fromkeys(FINDING_WEIGHTS, 0)
    normal = 0
    for p in range(80):
        kinds = plan_findings(np.random.default_rng([0, p, 2, 0]))
        normal += not kinds
        for k in kinds:
            counts[k] += 1
    assert 12 <= normal <= 36
    assert min(counts.values()) >= 3, counts


def test_plan_findings_plants_only_the_chosen_kinds_at_their_rate():
    from pipeline.demo.findings import FINDING_WEIGHTS, plan_findings

    chosen = {"Cardiomegaly": 1.0, "Lung nodule": 1.0, "Pleural effusion": 3.0}
    counts = dict.fromkeys(chosen, 0)
    normal = 0
    for p in range(400):
        kinds = plan_findings(np.random.default_rng([0, p]), chosen, normal_fraction=0.1)
        assert set(kinds) <= set(chosen) and len(kinds) == len(set(kinds)) <= 3
        normal += not kinds
        for k in kinds:
            counts[k] += 1
    assert 20 <= normal <= 65  # ~10% of 400
    assert counts["Pleural effusion"] > counts["Cardiomegaly"] and counts["Pleural effusion"] > counts["Lung nodule"]
    # naming every kind bare (their own weights) draws exactly what the default does
    every = dict(demo.finding_weights(list(FINDING_WEIGHTS)))
    assert every == FINDING_WEIGHTS
    a = [plan_findings(np.random.default_rng([1, p])) for p in range(50)]
    b = [plan_findings(np.random.default_rng([1, p]), every) for p in range(50)]
    assert a == b


def test_chosen_findings_are_the_only_labels(tmp_path):
    out = _gen(tmp_path / "c", n_cases=8, findings=["Cardiomegaly", "Pleural effusion"], normal_fraction=0.0)
    labels = pd.read_csv(out / "labels.csv").set_index("VolumeName")
    planted_cols = labels.columns[labels.sum() > 0]
    assert set(planted_cols) <= {"Cardiomegaly", "Pleural effusion"} and len(planted_cols) >= 1
    assert (labels[["Cardiomegaly", "Pleural effusion"]].sum(axis=1) >= 1).all()  # no normal case


def test_unknown_finding_kind_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"\['Cardiomegally'\].*Lung nodule"):
        demo.plan_cohort(10, 0, 64, 32, (1.6, 1.6, 4.0), findings=["Cardiomegally"])
    with pytest.raises(ValueError, match="> 0"):
        demo.plan_cohort(10, 0, 64, 32, (1.6, 1.6, 4.0), findings={"Cardiomegaly": 0.0})
    with pytest.raises(ValueError, match="normal_fraction"):
        demo.plan_cohort(10, 0, 64, 32, (1.6, 1.6, 4.0), normal_fraction=1.0)


# ---- determinism and atomic output ----------------------------------------------------------------

def _volumes(root: Path) -> dict[str, np.ndarray]:
    return {p.name: read(p) for p in sorted((root / "volumes").rglob("*.nii.gz"))}


def test_same_seed_is_identical_and_other_seed_differs(cohort, tmp_path):
    again = _gen(tmp_path / "again", workers=2)  # worker count must not matter
    for name in ("reports.csv", "labels.csv", "splits.csv", "region_report.csv", "planted.json"):
        assert (cohort / name).read_bytes() == (again / name).read_bytes(), name
    a, b = _volumes(cohort), _volumes(again)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    vid = next(iter(a)).removesuffix(".nii.gz")
    for name in ("lung", "lung nodule", "heart"):
        assert np.array_equal(mask(cohort, vid, name), mask(again, vid, name))

    other = _gen(tmp_path / "other", seed=SEED + 1)
    assert (cohort / "reports.csv").read_bytes() != (other / "reports.csv").read_bytes()
    c = _volumes(other)
    assert any(k in c and not np.array_equal(a[k], c[k]) for k in a)


def test_atomic_output_when_generation_fails(tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    calls = {"n": 0}
    real = demo._write_image

    def flaky(image, path):
        calls["n"] += 1
        if calls["n"] > 60:  # fails inside the second case
            raise OSError("disk full")
        real(image, path)

    monkeypatch.setattr(demo, "_write_image", flaky)
    with pytest.raises(OSError, match="disk full"):
        _gen(out, n_cases=4)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # the temporary sibling is removed too


def test_existing_output_is_replaced(tmp_path):
    out = tmp_path / "cohort"
    (out / "volumes").mkdir(parents=True)
    (out / "stale.txt").write_text("old", encoding="utf-8")
    _gen(out, n_cases=3)
    assert not (out / "stale.txt").exists()
    assert len(pd.read_csv(out / "reports.csv")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cohort"]


def test_cli_writes_cohort(tmp_path, capsys):
    demo.main(["--out", str(tmp_path / "c"), "--params-json", '{"n_cases": 3, "seed": 1}', "--shape-xy", "64",
               "--n-slices", "32", "--spacing", "1.6", "1.6", "4.0", "--workers", "1"])
    assert (tmp_path / "c" / "labels.csv").is_file()
    assert "3/3 volumes" in capsys.readouterr().out
    demo.main(["--out", str(tmp_path / "d"), "--shape-xy", "64", "--n-slices", "32", "--spacing", "1.6", "1.6", "4.0",
               "--workers", "1", "--params-json",
               '{"n_cases": 3, "seed": 1, "findings": {"Lung nodule": 2}, "normal_fraction": 0}'])
    labels = pd.read_csv(tmp_path / "d" / "labels.csv").set_index("VolumeName")
    assert labels["Lung nodule"].all() and labels.drop(columns="Lung nodule").sum().sum() == 0
    with pytest.raises(SystemExit):
        demo.main(["--out", str(tmp_path / "e"), "--params-json", '{"n_cases": 3, "findings": {"Lung nodule": "lots"}}'])
    assert "must be a number" in capsys.readouterr().err and not (tmp_path / "e").exists()


@pytest.mark.parametrize(("findings", "expect"), [
    ('["Lung nodule", "Cardiomegaly"]', '"findings": ["Lung nodule", "Cardiomegaly"], "n_cases": 24, "normal_fraction": 0.2'),
    ('{"Lung nodule": 2.0}', '"findings": {"Lung nodule": 2.0}, "n_cases": 24, "normal_fraction": 0.2'),
])
def test_config_findings_reach_the_generator(tmp_path, findings, expect):
    """`dataset.demo.findings` / `normal_fraction` are schema-checked and passed in the demo_cohort rule's
    `--params-json` (dry run)."""
    from helpers import E2E_CONFIG, snakemake

    overlay = tmp_path / "demo.yaml"
    overlay.write_text(f"dataset:\n  demo:\n    findings: {findings}\n    normal_fraction: 0.2\n", encoding="utf-8")
    proc = snakemake(tmp_path, "-n", "-p", "--forceall", "results/demo/cohort", timeout=300,
                     configfiles=(E2E_CONFIG, overlay))
    assert expect in proc.stdout + proc.stderr
    overlay.write_text("dataset:\n  demo:\n    findings: {Cardiomegaly: 0}\n", encoding="utf-8")
    bad = snakemake(tmp_path, "-n", "results/demo/cohort", timeout=300, check=False, configfiles=(E2E_CONFIG, overlay))
    assert bad.returncode != 0 and "findings" in bad.stdout + bad.stderr


def test_default_config_passes_no_planting_options(tmp_path):
    """Unset, the settings reach the generator as null (its own defaults: every kind, 30 % normal)."""
    from helpers import E2E_CONFIG, snakemake

    proc = snakemake(tmp_path, "-n", "-p", "--forceall", "results/demo/cohort", timeout=300, configfiles=(E2E_CONFIG,))
    out = proc.stdout + proc.stderr
    assert "python -m pipeline.demo_cohort" in out
    assert '"findings": null' in out and '"normal_fraction": null' in out
