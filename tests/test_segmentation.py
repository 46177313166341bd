"""Segmentation backends (precomputed, sat, totalsegmentator), the DICOM adapter and CT validation."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from helpers import REPO, huge_header_copy, write_image

from pipeline import dicom, regions, sat, segment, totalseg
from pipeline.io import InputError

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
STANDIN = REPO / "tests" / "sat_standin"
sys.path.insert(0, str(STANDIN))
from inference import TERM_HU  # noqa: E402  (the stand-in's HU bands)

# --- SAT: stand-in run, output mapped back onto the CT grid ----------------------------------------


def phantom_ct(direction: tuple[float, ...], spacing=(0.8, 0.8, 1.5), size=(170, 150, 70)) -> sitk.Image:
    """Air, a soft-tissue body (> 0 HU, so SAT's foreground crop applies), two lungs, a liver, a
    spleen and a bone bar, laid out in physical space; any direction (orientation) and spacing."""
    idx = np.indices(size[::-1]).reshape(3, -1)[::-1].T.astype(float)  # (n, 3): x, y, z index
    d = np.asarray(direction, float).reshape(3, 3) * np.asarray(spacing)
    origin = np.array([-70.0, 30.0, -400.0])
    p = origin + idx @ d.T
    p -= p.mean(0)

    def ellipsoid(centre, semi):
        return (((p - centre) / semi) ** 2).sum(1) <= 1

    hu = np.full(len(p), -1000.0)
    hu[ellipsoid([0, 0, 0], [64, 56, 200])] = 40
    hu[ellipsoid([-30, 0, 10], [25, 35, 40])] = -850
    hu[ellipsoid([30, 0, 10], [25, 35, 40])] = -850
    hu[ellipsoid([0, 25, -30], [32, 22, 25])] = 150
    hu[ellipsoid([-5, -28, -22], [26, 18, 26])] = 400
    hu[(np.abs(p[:, 0]) < 9) & (p[:, 1] > 36) & (p[:, 1] < 50)] = 900
    image = sitk.GetImageFromArray(hu.reshape(size[::-1]).astype(np.int16))
    image.SetSpacing(spacing)
    image.SetOrigin(tuple(origin))
    image.SetDirection(direction)
    return image


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("direction,launcher", [
    ((1, 0, 0, 0, 1, 0, 0, 0, 1), "python"),               # LPS, as DICOM-derived volumes
    ((0, 1, 0, -1, 0, 0, 0, 0, -1), "torchrun"),           # axes permuted and flipped
], ids=["lps", "permuted-flipped"])
def test_sat_output_mapped_back_matches_masks_on_the_original_grid(tmp_path: Path, direction, launcher) -> None:
    ct = phantom_ct(direction)
    ct_path = tmp_path / "train_1_a_1.nii.gz"
    sitk.WriteImage(ct, str(ct_path), useCompression=True)
    terms = ["lung", "liver", "spleen", "bone", "heart"]
    sat.write_jsonl([ct_path], terms, tmp_path / "in.jsonl")
    if launcher == "torchrun" and shutil.which("torchrun") is None:
        pytest.skip("torchrun not installed")
    launch = sys.executable if launcher == "python" else "torchrun --nproc_per_node=1"
    cmd = sat.inference_command(STANDIN, tmp_path / "in.jsonl", tmp_path / "raw", checkpoint="SAT_Pro.pth",
                                text_encoder_checkpoint="text_encoder.pth", launcher=launch)
    sat.run_inference(cmd, STANDIN)
    raw = tmp_path / "raw" / sat.SAT_DATASET
    # SAT's layout: identity affine, processed (RAS, 1 x 1 x 3 mm, cropped) grid
    sat_mask = sitk.ReadImage(str(raw / "seg_train_1_a_1" / "liver.nii.gz"))
    assert sat_mask.GetSpacing() == (1.0, 1.0, 1.0) and sat_mask.GetSize() != ct.GetSize()
    info = sat.map_back("train_1_a_1", ct_path, raw, tmp_path / "masks", terms)
    assert info["correlation"] > 0.99 and info["n_structures"] == 5 and info["n_non_empty"] == 4
    original = sitk.GetArrayFromImage(ct).astype(float)
    for term in ("lung", "liver", "spleen", "bone"):
        lo, hi = TERM_HU[term]
        direct = (original >= lo) & (original < hi)  # the same "segmentation" made on the original grid
        mapped_img = sitk.ReadImage(str(tmp_path / "masks" / "seg_train_1_a_1" / f"{term}.nii.gz"))
        assert mapped_img.GetSize() == ct.GetSize() and mapped_img.GetDirection() == ct.GetDirection()
        assert np.allclose(mapped_img.GetOrigin(), ct.GetOrigin())
        mapped = sitk.GetArrayFromImage(mapped_img) > 0
        assert dice(mapped, direct) >= 0.95, (term, dice(mapped, direct))
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "seg_train_1_a_1" / "heart.nii.gz"))).any()


def test_sat_backend_through_segment_and_regions(tmp_path: Path) -> None:
    ct = phantom_ct((1, 0, 0, 0, 1, 0, 0, 0, 1), size=(120, 100, 40))
    ct_path = tmp_path / "train_1_a_1.nii.gz"
    sitk.WriteImage(ct, str(ct_path), useCompression=True)
    manifest = pd.DataFrame({"volume_id": ["train_1_a_1"], "shard": [0], "ct_path": [str(ct_path)],
                             "mask_dir": [""]})
    terms = segment.prepare_sat(manifest, 0, TABLE, tmp_path / "in.jsonl")
    assert set(terms) == set(TABLE.bits) and "lung" in terms
    line = json.loads((tmp_path / "in.jsonl").read_text(encoding="utf-8"))
    assert line["modality"] == "ct" and line["image"] == str(ct_path.resolve()) and len(line["label"]) == len(terms)
    cmd = sat.inference_command(STANDIN, tmp_path / "in.jsonl", tmp_path / "raw", checkpoint="c", text_encoder_checkpoint="t",
                                launcher=sys.executable)
    sat.run_inference(cmd, STANDIN)
    table = segment.run_shard(manifest, 0, "sat", tmp_path / "seg.parquet", qc_out=tmp_path / "qc.parquet",
                              masks_out=tmp_path / "masks", cfg={"sat_raw": str(tmp_path / "raw")})
    assert table["status"].tolist() == ["ok"] and "correlation" in table["note"][0]
    qc = regions.run_shard(manifest, 0, TABLE, tmp_path / "m.zarr", tmp_path / "rqc.parquet", segment=table)
    assert qc["status"].tolist() == ["ok"] and list(qc["unknown"][0]) == []
    import zarr

    labels = zarr.open_group(str(tmp_path / "m.zarr"), mode="r")["train_1_a_1"][...]
    assert regions.unpack_channel(labels, "lung").any() and regions.unpack_channel(labels, "osseous").any()


# --- TotalSegmentator ------------------------------------------------------------------------------


def _fake_totalsegmentator(tmp_path: Path, labelmap: Path) -> Path:
    """An executable with TotalSegmentator's command line that writes a fixed label map."""
    exe = tmp_path / "bin" / "TotalSegmentator"
    exe.parent.mkdir()
    exe.write_text(f"""#!{sys.executable}
import shutil, sys
args = sys.argv[1:]
assert "--ml" in args
shutil.copy({str(labelmap)!r}, args[args.index("-o") + 1])
""", encoding="utf-8")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def test_totalsegmentator_backend_runs_the_command_and_maps_its_labels(tmp_path: Path) -> None:
    shape = (6, 10, 12)
    ct = write_image(tmp_path / "v1.nii.gz", np.full(shape, -700, np.int16))
    lab = np.zeros(shape, np.uint8)
    lab[:3] = 10
    lab[3:, :4] = 2
    labelmap = write_image(tmp_path / "fixed.nii.gz", lab)
    names = tmp_path / "names.tsv"
    names.write_text("# id\tname\n2\tkidney_right\n10\tlung_upper_lobe_left\n", encoding="utf-8")
    exe = _fake_totalsegmentator(tmp_path, labelmap)
    manifest = pd.DataFrame({"volume_id": ["v1"], "shard": [0], "ct_path": [str(ct)], "mask_dir": [""]})
    table = segment.run_shard(manifest, 0, "totalsegmentator", tmp_path / "seg.parquet", masks_out=tmp_path / "m",
                              cfg={"command": str(exe), "label_names": str(names)})
    assert table["mask_format"].tolist() == ["labelmap"] and table["vocabulary"].tolist() == ["totalsegmentator"]
    qc = regions.run_shard(manifest, 0, TABLE, tmp_path / "z.zarr", tmp_path / "q.parquet", segment=table)
    assert qc["status"].tolist() == ["ok"]
    import zarr

    labels = zarr.open_group(str(tmp_path / "z.zarr"), mode="r")["v1"][...]
    assert regions.unpack_channel(labels, "left_upper_lobe").sum() == 3 * 10 * 12
    assert regions.unpack_channel(labels, "right_kidney").sum() == 3 * 4 * 12


def test_totalsegmentator_missing_is_a_clear_error(tmp_path: Path) -> None:
    ct = write_image(tmp_path / "v1.nii.gz", np.zeros((4, 5, 6), np.int16))
    with pytest.raises(RuntimeError, match="not found: install TotalSegmentator"):
        totalseg.run("v1", ct, tmp_path / "out.nii.gz", command=str(tmp_path / "no-such-TotalSegmentator"))
    assert not (tmp_path / "out.nii.gz").exists()


@pytest.mark.skipif(not totalseg.is_installed() or not os.environ.get("MEDREGION_RUN_TOTALSEGMENTATOR"),
                    reason="TotalSegmentator not installed (or MEDREGION_RUN_TOTALSEGMENTATOR unset: it needs its weights)")
def test_real_totalsegmentator_on_the_example(shared_data: Path, tmp_path: Path) -> None:
    ct = shared_data / "totalsegmentator" / "example_ct_sm.nii.gz"
    out = totalseg.run("example", ct, tmp_path / "seg.nii.gz", args=["--fast"])
    vm = regions.merge_labelmap("example", ct, out, totalseg.class_map(), TABLE)
    assert regions.unpack_channel(vm.labels, "liver").any()


# --- precomputed: CT validation (bad input: each names volume and file, nothing written) -------------


def _precomputed(tmp_path: Path, ct: Path, vid: str = "v1") -> tuple[pd.DataFrame, Path]:
    mask_dir = tmp_path / f"seg_{vid}"
    write_image(mask_dir / "liver.nii.gz", np.zeros((4, 5, 6), np.uint8))
    return pd.DataFrame({"volume_id": [vid], "shard": [0], "ct_path": [str(ct)], "mask_dir": [str(mask_dir)]}), mask_dir


def _segment_fails(tmp_path: Path, manifest: pd.DataFrame, match: str, **kw) -> None:
    out, qc = tmp_path / "seg.parquet", tmp_path / "qc.parquet"
    with pytest.raises(InputError, match=match):
        segment.run_shard(manifest, 0, "precomputed", out, "fail", qc, **kw)
    assert not out.exists() and not qc.exists()
    table = segment.run_shard(manifest, 0, "precomputed", out, "skip", qc, **kw)
    assert table["status"].tolist() == ["error"]
    assert pd.read_parquet(qc)[["volume_id", "stage", "status"]].values.tolist() == [
        [manifest["volume_id"][0], "segment", "error"]]
    out.unlink()
    qc.unlink()


def test_precomputed_ok(tmp_path: Path) -> None:
    ct = write_image(tmp_path / "v1.nii.gz", np.zeros((4, 5, 6), np.int16))
    manifest, mask_dir = _precomputed(tmp_path, ct)
    table = segment.run_shard(manifest, 0, "precomputed", tmp_path / "s.parquet")
    assert table[["status", "mask_path", "n_structures"]].values.tolist() == [["ok", str(mask_dir), 1]]


def test_nan_voxels_in_ct(tmp_path: Path) -> None:
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 2, 3] = np.nan
    ct = write_image(tmp_path / "v1.nii.gz", arr)
    _segment_fails(tmp_path, _precomputed(tmp_path, ct)[0], r"volume v1: .*v1\.nii\.gz contains 1 NaN or inf voxels")


def test_truncated_ct(tmp_path: Path) -> None:
    ct = write_image(tmp_path / "v1.nii.gz", np.random.default_rng(0).integers(-1000, 1000, (20, 30, 30)).astype(np.int16))
    data = ct.read_bytes()
    ct.write_bytes(data[: len(data) * 2 // 3])
    _segment_fails(tmp_path, _precomputed(tmp_path, ct)[0], r"volume v1: .*v1\.nii\.gz")


def test_4d_ct(tmp_path: Path) -> None:
    ct = tmp_path / "v1.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.int16), isVector=False), str(ct))
    _segment_fails(tmp_path, _precomputed(tmp_path, ct)[0], r"volume v1: .*v1\.nii\.gz is 4D")


def test_ct_header_beyond_memory_cap(tmp_path: Path) -> None:
    small = write_image(tmp_path / "small.nii.gz", np.zeros((4, 5, 6), np.int16))
    ct = huge_header_copy(small, tmp_path / "v1.nii.gz", (20000, 20000, 3000))
    _segment_fails(tmp_path, _precomputed(tmp_path, ct)[0], r"volume v1: .*v1\.nii\.gz has 20000x20000x3000 voxels"
                   r".*memory cap", memory_cap_gb=2)


def test_mask_folder_missing_and_unsafe_id(tmp_path: Path) -> None:
    ct = write_image(tmp_path / "v1.nii.gz", np.zeros((4, 5, 6), np.int16))
    manifest, mask_dir = _precomputed(tmp_path, ct)
    shutil.rmtree(mask_dir)
    _segment_fails(tmp_path, manifest, r"volume v1: mask folder not found: .*seg_v1")
    manifest, _ = _precomputed(tmp_path, ct, vid="a/../b")
    _segment_fails(tmp_path, manifest, r"unsafe volume id 'a/\.\./b'")


def test_segment_cli(tmp_path: Path) -> None:
    ct = write_image(tmp_path / "v1.nii.gz", np.zeros((4, 5, 6), np.int16))
    manifest, _ = _precomputed(tmp_path, ct)
    manifest.to_parquet(tmp_path / "cohort.parquet")
    segment.main(["--manifest", str(tmp_path / "cohort.parquet"), "--shard", "0", "--out", str(tmp_path / "s.parquet"),
                  "--qc", str(tmp_path / "qc.parquet")])
    assert pd.read_parquet(tmp_path / "s.parquet")["status"].tolist() == ["ok"]


# --- DICOM -----------------------------------------------------------------------------------------


def test_dicom_example_converts_with_geometry_and_hu(shared_data: Path, tmp_path: Path) -> None:
    folder = shared_data / "totalsegmentator" / "example_ct_dicom"
    info = dicom.convert_series(folder, tmp_path / "ct.nii.gz", "example")
    image = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    # 20 slices, 3 mm thick (SliceThickness); their centres are 2 mm apart (overlapping reconstruction)
    assert image.GetSize() == (512, 512, 20) and info["n_slices"] == 20 and info["slice_thickness"] == 3.0
    assert image.GetSpacing() == pytest.approx((0.9765625, 0.9765625, 2.0))
    assert image.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))  # IOP 1\0\0\0\1\0, kept
    assert image.GetOrigin() == pytest.approx((-249.51171875, -437.51171875, -804.5))  # lowest slice first
    hu = sitk.GetArrayFromImage(image)
    assert hu.min() == -1024 and 1000 < hu.max() < 3100  # air and bone: the rescale (-1024) was applied
    body = hu[hu > -500]
    assert -200 < np.median(body) < 200  # soft tissue around 0-60 HU
    # same voxels as GDCM's own series reader (sorted by position)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    assert (sitk.GetArrayFromImage(reader.Execute()) == hu).all()


def _write_series(folder: Path, hu: np.ndarray, positions: list[float], names: list[str], series: str = "1.2.3.4.5",
                  patient: tuple[str, str] = ("Doe^Jane", "SECRET-ID-123")) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, (z, name) in enumerate(zip(positions, names)):
        sl = sitk.GetImageFromArray(hu[k:k + 1])
        sl.SetSpacing((0.7, 0.6, 1.0))
        tags = {"0010|0010": patient[0], "0010|0020": patient[1], "0010|0030": "19450508", "0008|0050": "ACC998877",
                "0008|0060": "CT", "0020|000d": "1.2.3.4", "0020|000e": series, "0008|0018": f"{series}.{k}",
                "0020|0032": f"-10\\-20\\{z}", "0020|0037": "1\\0\\0\\0\\1\\0", "0028|1052": "-1024",
                "0028|1053": "1", "0020|0013": str(k + 1), "0028|0030": "0.6\\0.7"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(folder / name))
        writer.Execute(sl)


def test_dicom_sorted_by_position_and_no_identifying_tag_copied(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, (6, 16, 20)).astype(np.int16)
    positions = [100.0 - 2.5 * k for k in range(6)]  # descending z: the file order is not the geometry
    names = [f"IMG{n:04d}.dcm" for n in rng.permutation(6)]
    _write_series(tmp_path / "series", hu, positions, names)
    info = dicom.convert_series(tmp_path / "series", tmp_path / "out.nii.gz", "v1")
    image = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert (sitk.GetArrayFromImage(image) == hu[::-1]).all()  # lowest z first
    assert image.GetOrigin() == pytest.approx((-10.0, -20.0, 87.5)) and image.GetSpacing() == pytest.approx((0.7, 0.6, 2.5))
    assert info["min"] == float(hu.min())
    raw = gzip.decompress((tmp_path / "out.nii.gz").read_bytes())
    for secret in (b"Doe", b"Jane", b"SECRET-ID-123", b"19450508", b"ACC998877", b"1.2.3.4"):
        assert secret not in raw, secret
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_dicom_bad_series(tmp_path: Path) -> None:
    hu = np.zeros((4, 8, 8), np.int16)
    _write_series(tmp_path / "gap", hu, [0.0, 2.0, 4.0, 8.0], ["a.dcm", "b.dcm", "c.dcm", "d.dcm"])
    with pytest.raises(InputError, match=r"volume v1: uneven slice spacing in .*gap"):
        dicom.convert_series(tmp_path / "gap", tmp_path / "x.nii.gz", "v1")
    _write_series(tmp_path / "two", hu[:2], [0.0, 2.0], ["a.dcm", "b.dcm"], series="1.2.3.9")
    _write_series(tmp_path / "two", hu[:2], [0.0, 2.0], ["c.dcm", "d.dcm"], series="1.2.3.8")
    with pytest.raises(InputError, match=r"volume v1: .*two holds 2 series"):
        dicom.convert_series(tmp_path / "two", tmp_path / "x.nii.gz", "v1")
    assert dicom.convert_series(tmp_path / "two", tmp_path / "x.nii.gz", "v1", series_uid="1.2.3.8")["n_slices"] == 2
    with pytest.raises(InputError, match=r"volume v1: no DICOM image slices in .*empty"):
        (tmp_path / "empty").mkdir()
        dicom.convert_series(tmp_path / "empty", tmp_path / "y.nii.gz", "v1")
    assert not (tmp_path / "y.nii.gz").exists()
