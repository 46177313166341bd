"""Own data through one table (`dataset.adapter: manifest`, pipeline/own_data.py): the table's rows become
the cohort manifest and the reports' ground truth, bad rows are refused naming the row and the file, DICOM
rows are converted by the workflow's `dicom_import` rule, demo models live under the configured results
folder, and the example over TotalSegmentator's files runs to the end of `all`.

Times on the 2-core machine (shared with other work): the unit tests and dry runs ~25 s together; the
DICOM rule test ~20 s; the example through `all` (marked slow) ~3-4 min.
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml
from helpers import REPO, snakemake, write_image

from pipeline import cohort, own_data, reports
from pipeline.config_check import placeholder_keys, resolve_demo_model_paths
from pipeline.constants import CTRATE_CLASSES, REGIONS
from pipeline.io import InputError

TABLE = REPO / "config" / "regions.yaml"


def _ct(path: Path, shape=(6, 10, 12), value: int = -800) -> Path:
    return write_image(path, np.full(shape, value, np.int16), spacing=(0.8, 0.8, 2.5))


def _own_files(root: Path) -> None:
    """Two CTs with masks the two ways (a folder; a label map + its names file) under `root/data`."""
    data = root / "data"
    _ct(data / "ct" / "case01.nii.gz")
    _ct(data / "ct" / "scan-3.b.nii.gz")
    mask = np.zeros((6, 10, 12), np.uint8)
    mask[1:4, 2:6, 3:7] = 1
    write_image(data / "masks" / "case01" / "liver.nii.gz", mask, spacing=(0.8, 0.8, 2.5))
    write_image(data / "labels" / "scan-3.b.nii.gz", (mask * 5).astype(np.uint8), spacing=(0.8, 0.8, 2.5))
    (data / "names.tsv").write_text("5\tliver\n", encoding="utf-8")


def _rows() -> list[dict[str, str]]:
    return [
        {"volume_id": "scan-3.b", "patient_id": "p2", "split": "test", "ct": "data/ct/scan-3.b.nii.gz",
         "masks": "data/labels/scan-3.b.nii.gz", "mask_label_names": "data/names.tsv", "findings": ""},
        {"volume_id": "case01", "patient_id": "p1", "split": "train", "ct": "data/ct/case01.nii.gz",
         "masks": "data/masks/case01", "mask_label_names": "", "findings": "The liver is normal."},
    ]


def _write(root: Path, rows: list[dict[str, str]], suffix: str = ".csv", name: str = "cohort") -> Path:
    path = root / f"{name}{suffix}"
    df = pd.DataFrame(rows)
    if suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".csv-with-bom"])
def test_table_rows_become_the_cohort_manifest(tmp_path: Path, suffix: str) -> None:
    _own_files(tmp_path)
    table = _write(tmp_path, _rows(), suffix.removesuffix("-with-bom"))
    if suffix.endswith("-with-bom"):  # as a spreadsheet saves "CSV UTF-8"
        table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())
    manifest = cohort.build_own_manifest(table, shard_size=1, dicom_dir=tmp_path / "dicom", require_masks=True)
    assert list(manifest.columns) == list(cohort.MANIFEST_COLUMNS)
    # ids in any safe shape, sorted, one shard each at shard_size 1
    assert manifest["volume_id"].tolist() == ["case01", "scan-3.b"] and manifest["shard"].tolist() == [0, 1]
    assert manifest["split"].tolist() == ["train", "test"]
    # relative paths resolve against the table's folder, from any working directory
    assert Path(manifest.loc[0, "ct_path"]) == tmp_path / "data" / "ct" / "case01.nii.gz"
    # the contract with the segment stage: a folder, or a label map with its names file
    assert Path(manifest.loc[0, "mask_dir"]).is_dir() and manifest.loc[0, "mask_label_names"] == ""
    assert Path(manifest.loc[1, "mask_dir"]).is_file()
    assert Path(manifest.loc[1, "mask_label_names"]) == tmp_path / "data" / "names.tsv"


# Each bad table: what to change in the good rows, and what the error must say besides the file and row.
BAD_ROWS = {
    "missing_ct": (lambda r: r[1].update(ct="data/ct/nope.nii.gz"), 2, r"CT file not found: .*nope\.nii\.gz"),
    "duplicate_id": (lambda r: r.append({**r[1], "patient_id": "p1"}), 3, r"duplicate volume id 'case01', first on .*row 2"),
    "unknown_split": (lambda r: r[1].update(split="holdout"), 2, r"unknown split 'holdout'"),
    "label_map_without_names": (lambda r: r[0].update(mask_label_names=""), 1,
                                r"is a label map but mask_label_names is empty"),
    "names_with_a_folder": (lambda r: r[1].update(mask_label_names="data/names.tsv"), 2,
                            r"label names belong to a label-map file"),
    "path_separator_in_id": (lambda r: r[1].update(volume_id="a/b"), 2, r"unsafe volume id 'a/b'"),
    "dotdot_in_id": (lambda r: r[1].update(volume_id="x..y"), 2, r"unsafe volume id 'x\.\.y'"),
    "empty_training_findings": (lambda r: r[1].update(findings=""), 2, r"empty findings in the train split"),
    "patient_in_two_splits": (lambda r: r[1].update(patient_id="p2"), 2, r"patient 'p2' is in two splits"),
    "label_not_0_or_1": (lambda r: r[1].update({c: "0" for c in CTRATE_CLASSES} | {"Cardiomegaly": "yes"}), 2,
                         r"labels must be 0 or 1.*Cardiomegaly"),
    "missing_masks_for_precomputed": (lambda r: r[1].update(masks=""), 2, r"empty masks"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_are_refused_naming_row_and_file(tmp_path: Path, case: str) -> None:
    _own_files(tmp_path)
    rows = _rows()
    change, row, message = BAD_ROWS[case]
    change(rows)
    table = _write(tmp_path, rows)
    with pytest.raises(InputError) as err:
        cohort.build_own_manifest(table, 1, tmp_path / "dicom", require_masks=True)
    text = str(err.value)
    assert str(table) in text and f"row {row} (line {row + 1})" in text, text
    assert re.search(message, text), text


def test_a_row_after_a_multiline_report_is_named_by_its_line(tmp_path: Path) -> None:
    _own_files(tmp_path)
    rows = _rows()
    rows[0]["findings"] = "First line of the report.\nSecond line.\nThird line."
    rows[1]["split"] = "holdout"
    table = _write(tmp_path, rows)
    with pytest.raises(InputError, match=r"cohort\.csv, row 2 \(line 5\) \(volume case01\): unknown split"):
        own_data.read_own_manifest(table)


def test_bad_tables_are_refused_naming_the_file(tmp_path: Path) -> None:
    _own_files(tmp_path)
    rows = _rows()
    for r in rows:
        r["findngs"] = r.pop("findings")  # a misspelt column is not dropped without a word
    with pytest.raises(InputError, match=r"cohort\.csv: the manifest lacks columns \['findings'\]"):
        own_data.read_own_manifest(_write(tmp_path, rows))
    rows = _rows()
    rows[0]["Cardiomegaly"] = "1"  # one label column of 18
    with pytest.raises(InputError, match=r"all 18 CT-RATE classes or none; missing \['Medical material'"):
        own_data.read_own_manifest(_write(tmp_path, rows))
    with pytest.raises(InputError, match=r"cohort\.tsv: an own-data manifest is a \.csv or \.parquet"):
        own_data.read_own_manifest(_write(tmp_path, _rows()).rename(tmp_path / "cohort.tsv"))


def test_region_texts_and_labels_reach_the_reports(tmp_path: Path) -> None:
    _own_files(tmp_path)
    rows = _rows()
    labels = {c: "0" for c in CTRATE_CLASSES} | {"Hiatal hernia": "1"}
    rows[1].update(labels, heart="Heart size is normal.", abdomen="The liver is normal.",
                   findings="Heart size is normal. The liver is normal.")
    rows[0].update({c: "" for c in CTRATE_CLASSES}, findings="A 4 mm nodule in the right lung.")
    table = _write(tmp_path, rows)
    truth = tmp_path / "truth"
    manifest = cohort.build_own_manifest(table, 8, tmp_path / "dicom", truth_dir=truth)
    out = reports.build_reports(manifest, [truth / "region_report.csv"], [truth / "labels.csv"], TABLE)
    out = out.set_index("volume_id")
    # the table's region texts are the ground truth where given; otherwise the findings are split
    assert out.loc["case01", "region_source"] == "grounded"
    assert out.loc["case01", "heart"] == "Heart size is normal." and out.loc["case01", "lung"] == ""
    assert out.loc["scan-3.b", "region_source"] == "keywords" and "nodule" in out.loc["scan-3.b", "lung"]
    # labels where given (all 18), missing (not 0) where the row leaves them empty
    assert out.loc["case01", "Hiatal hernia"] == 1 and out.loc["case01", "Cardiomegaly"] == 0
    assert all(math.isnan(out.loc["scan-3.b", c]) for c in CTRATE_CLASSES)
    assert set(REGIONS) <= set(out.columns)


# ---- DICOM rows ------------------------------------------------------------------------------------


def _dicom_series(folder: Path, n: int, series: str, first_name: int = 0) -> Path:
    """`n` real DICOM CT slices (GDCM via SimpleITK), 2 mm apart, of one series."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n):
        sl = sitk.GetImageFromArray(np.full((1, 8, 8), 40 + k, np.int16))
        for tag, value in {"0008|0060": "CT", "0020|000e": series, "0008|0018": f"{series}.{k}",
                           "0020|0032": f"0\\0\\{2.0 * k}", "0020|0037": "1\\0\\0\\0\\1\\0",
                           "0028|0030": "0.7\\0.7"}.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{first_name + k}.dcm"))
        writer.Execute(sl)
    return folder


def test_dicom_folder_with_two_series_names_row_and_folder(tmp_path: Path) -> None:
    _own_files(tmp_path)
    folder = _dicom_series(tmp_path / "data" / "dicom_case", 3, "1.2.3.9")
    _dicom_series(folder, 3, "1.2.3.8", first_name=10)
    rows = _rows() + [{"volume_id": "dcm7", "patient_id": "p3", "split": "validation", "ct": "data/dicom_case",
                       "masks": "data/masks/case01", "findings": "No finding."}]
    table = _write(tmp_path, rows)
    vols = own_data.read_own_manifest(table)
    assert [v.ct_format for v in vols] == ["nifti", "dicom", "nifti"]
    assert own_data.dicom_shards(vols, 1) == [1]  # case01, dcm7, scan-3.b: dcm7 is in shard 1
    with pytest.raises(InputError) as err:
        own_data.import_dicom_shard(table, 1, 1, tmp_path / "out" / "shard-1", tmp_path / "qc.parquet")
    text = str(err.value)
    assert f"{table}, row 3 (line 4) (volume dcm7)" in text and str(folder) in text and "holds 2 series" in text
    assert text.endswith("dicom_series_uid column): 1.2.3.8, 1.2.3.9")  # the choices, and where to choose
    assert not (tmp_path / "out" / "shard-1").exists()  # nothing half-written
    # under on_error: skip the volume is recorded and left out
    qc = own_data.import_dicom_shard(table, 1, 1, tmp_path / "out" / "shard-1", tmp_path / "qc.parquet", "skip")
    assert qc["status"].tolist() == ["error"] and "holds 2 series" in qc.loc[0, "error"]
    assert list((tmp_path / "out" / "shard-1").iterdir()) == []
    # dicom_series_uid picks one series
    rows[-1]["dicom_series_uid"] = "1.2.3.8"
    table = _write(tmp_path, rows)
    qc = own_data.import_dicom_shard(table, 1, 1, tmp_path / "out" / "shard-1", tmp_path / "qc.parquet")
    image = sitk.ReadImage(str(tmp_path / "out" / "shard-1" / "dcm7.nii.gz"))
    assert qc["status"].tolist() == ["ok"] and image.GetSize() == (8, 8, 3)
    assert sitk.GetArrayFromImage(image)[:, 0, 0].tolist() == [40, 41, 42]


def test_dicom_rule_converts_the_series_for_the_cohort(shared_data: Path, tmp_path: Path) -> None:
    """The workflow converts a DICOM row by itself (`dicom_import`), and the cohort points at the result."""
    from pipeline.dicom import read_series

    _own_files(tmp_path)
    series = shared_data / "totalsegmentator" / "example_ct_dicom"
    rows = _rows() + [{"volume_id": "ts_dicom", "patient_id": "p3", "split": "validation", "ct": str(series),
                       "masks": "data/masks/case01", "findings": "Upper abdomen."}]
    table = _write(tmp_path, rows)
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({"shard_size": 2, "dataset": {"adapter": "manifest", "manifest": str(table)}}))
    snakemake(tmp_path, "--until", "cohort", configfiles=[config])
    manifest = pd.read_parquet(tmp_path / "results" / "cohort.parquet").set_index("volume_id")
    converted = Path(manifest.loc["ts_dicom", "ct_path"])
    assert converted == Path("results/dicom/shard-1/ts_dicom.nii.gz")  # ids sorted: case01, scan-3.b | ts_dicom
    image, expected = sitk.ReadImage(str(tmp_path / converted)), read_series(series, "ts_dicom")
    assert image.GetSize() == (512, 512, 20) and np.allclose(image.GetDirection(), expected.GetDirection())
    assert np.allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
    qc = pd.read_parquet(tmp_path / "results" / "qc" / "dicom" / "shard-1.parquet")
    assert qc["status"].tolist() == ["ok"]


# ---- planning: shards from the table, demo models under results:, placeholders ---------------------


def _job_counts(stdout: str) -> dict[str, int]:
    table = stdout[stdout.index("Job stats"):]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_shards_are_planned_from_the_table_rows(tmp_path: Path) -> None:
    _own_files(tmp_path)
    rows = [{**_rows()[1], "volume_id": f"case{i:02d}", "patient_id": f"p{i}"} for i in range(7)]
    table = _write(tmp_path, rows)
    config = tmp_path / "own.yaml"
    config.write_text(yaml.safe_dump({"shard_size": 3, "dataset": {"adapter": "manifest", "manifest": str(table)}}))
    jobs = _job_counts(snakemake(tmp_path, "-n", "all", configfiles=[config]).stdout)
    assert jobs["segment"] == jobs["regions"] == jobs["features"] == 3 and jobs["cohort"] == 1  # 7 rows / 3
    assert "dicom_import" not in jobs


def test_demo_models_live_under_the_configured_results(tmp_path: Path) -> None:
    for results in ("results", "other-results"):
        config = tmp_path / f"{results}.yaml"
        config.write_text(yaml.safe_dump({"results": results}))
        out = snakemake(tmp_path, "-n", "all", configfiles=[config]).stdout
        assert f"output: {results}/demo/models/encoder\n" in out and f"output: {results}/demo/models/llm\n" in out
    # the unit: unset path + build_demo -> under results; an explicit path is kept; no path, no demo: refused
    cfg = {"features": {"encoder": {"path": None, "build_demo": True}}, "llm": {"path": "/models/llama", "build_demo": False}}
    resolve_demo_model_paths(cfg, "res-a")
    assert cfg["features"]["encoder"]["path"] == "res-a/demo/models/encoder" and cfg["llm"]["path"] == "/models/llama"
    with pytest.raises(ValueError, match=r"llm\.path is not set"):
        resolve_demo_model_paths({"features": {"encoder": {"path": "x"}}, "llm": {"path": None}}, "r")
    gguf = {"features": {"encoder": {"path": "x"}}, "llm": {"path": None, "gguf": "model.gguf"}}
    resolve_demo_model_paths(gguf, "r")  # a GGUF import names its own folder (llm.smk)
    assert gguf["llm"]["path"] is None


def test_template_placeholders_are_named(tmp_path: Path) -> None:
    template = yaml.safe_load((REPO / "config" / "radgenome.yaml").read_text(encoding="utf-8"))
    keys = placeholder_keys(template)
    assert keys == ["dataset.volumes_dir", "dataset.masks_dir", "dataset.reports_csv[0]",
                    "dataset.region_report_csv[0]", "dataset.labels_csv[0]", "features.encoder.path", "llm.path"]
    template["segmentation"]["backend"] = "sat"  # the SAT paths count only for the SAT backend
    assert "segmentation.sat.checkpoint" in placeholder_keys(template)
    proc = snakemake(tmp_path, "-n", "all", check=False, configfiles=[REPO / "config" / "radgenome.yaml"])
    assert proc.returncode != 0
    assert "placeholder paths (/path/to/...) in dataset.volumes_dir, dataset.masks_dir" in proc.stdout + proc.stderr
    # the own-data override's table path is a placeholder too, until the user's file is named
    proc = snakemake(tmp_path, "-n", "all", check=False, configfiles=[REPO / "config" / "own_data_demo_models.yaml"])
    assert proc.returncode != 0 and "placeholder paths (/path/to/...) in dataset.manifest:" in proc.stdout + proc.stderr


# ---- the documented example, through `all` -----------------------------------------------------------

TINY = {
    "shard_size": 5,  # one shard: shard planning from the rows has its own test; this saves a job per stage
    "train": {"stage1": {"epochs": 1, "lr": 1.0e-3, "batch_size": 2, "seed": 0},
              "stage2": {"epochs": 1, "lr": 3.0e-3, "batch_size": 2, "seed": 0}},
    "generate": {"max_new_tokens": 16, "batch_size": 4},
    "llm": {"demo_pretrain_steps": 5, "demo_vocab_size": 300},
    "regions": {"threads": 1, "qc_pictures": 1},
}


@pytest.mark.slow
def test_example_runs_through_all_with_the_demo_models(shared_data: Path, tmp_path: Path) -> None:
    table = own_data.write_example(shared_data, tmp_path / "example")
    assert not any(tmp_path.glob("example/*.nii*"))  # the table points at shared/, nothing copied
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump(TINY), encoding="utf-8")
    snakemake(tmp_path, "all", configfiles=[REPO / "config" / "own_data_demo_models.yaml",
                                            tmp_path / "example" / "config.yaml", tiny])
    results = tmp_path / "example" / "results"
    assert (results / "demo" / "models" / "encoder" / "config.json").is_file()  # under its own results
    assert (results / "experiments" / "full" / "metrics.json").is_file()
    manifest = pd.read_parquet(results / "cohort.parquet")
    assert len(manifest) == len(pd.read_csv(table)) == 5 and set(manifest["split"]) == {"train", "validation", "test"}
    attrs = pd.concat(pd.read_parquet(p) for p in sorted((results / "attributes").glob("shard-*.parquet")))
    ts = attrs[attrs["volume_id"] == "ts_abdomen_train"].iloc[0]
    lobes = ["right_lower_lobe_ml", "left_upper_lobe_ml", "left_lower_lobe_ml"]  # the lobes this scan holds
    missing = [c for c in (*lobes, "liver_ml", "left_kidney_ml", "right_kidney_ml") if not ts[c] > 0]
    if missing:
        pytest.skip(f"TotalSegmentator label-map vocabulary in the segment/regions stages: {missing} not measured")
    # the kidneys' volumes are their voxel counts x the voxel volume of the label map
    seg = sitk.ReadImage(str(shared_data / "totalsegmentator" / "example_seg.nii.gz"))
    labels, voxel_ml = sitk.GetArrayFromImage(seg), float(np.prod(seg.GetSpacing())) / 1000
    names = own_data_names(shared_data)
    for side in ("left", "right"):
        expected = int((labels == names[f"kidney_{side}"]).sum()) * voxel_ml
        assert ts[f"{side}_kidney_ml"] == pytest.approx(expected, rel=1e-3, abs=0.05), side
    test = pd.read_parquet(results / "reports" / "test.parquet").set_index("volume_id")
    assert test.loc["aorta_chest_test", "region_source"] == "grounded"
    assert test.loc["aorta_chest_test", "airways"] == "The trachea is in the field of view."


def own_data_names(shared_data: Path) -> dict[str, int]:
    from pipeline.regions import read_label_names

    names = read_label_names(shared_data / "label-maps" / "totalsegmentator_v2_total.tsv")
    return {v: k for k, v in names.items()}


def test_example_table_is_valid_and_copies_nothing(shared_data: Path, tmp_path: Path) -> None:
    table = own_data.write_example(shared_data, tmp_path / "ex")
    vols = own_data.read_own_manifest(table, require_masks=True)
    assert {v.split for v in vols} == {"train", "validation", "test"}
    assert all(shared_data.resolve() in v.ct.resolve().parents for v in vols)
    config = yaml.safe_load((tmp_path / "ex" / "config.yaml").read_text(encoding="utf-8"))
    assert config["dataset"] == {"adapter": "manifest", "manifest": str(table)}
    shutil.rmtree(tmp_path / "ex")


def test_totalsegmentator_not_installed_is_said_before_label_names(tmp_path: Path) -> None:
    from pipeline import totalseg

    try:
        import totalsegmentator  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("TotalSegmentator is installed here")
    with pytest.raises(RuntimeError) as err:
        totalseg.class_map(None, command=str(tmp_path / "no-such-TotalSegmentator"))
    text = str(err.value)
    assert text.startswith("`") and "not found: install TotalSegmentator" in text
    assert text.index("not found") < text.index("label_names")
    # installed as a program elsewhere, its package not importable here: then the class map is what is missing
    exe = tmp_path / "TotalSegmentator"
    exe.write_text("#!/bin/sh\n", encoding="utf-8")
    exe.chmod(0o755)
    with pytest.raises(RuntimeError, match=r"^segmentation\.totalsegmentator\.label_names is not set"):
        totalseg.class_map(None, command=str(exe))
