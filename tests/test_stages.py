"""Unit tests of the data stages: cohort, reports (features: test_features.py; regions, attributes:
test_regions_attributes.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from helpers import write_image

from pipeline import cohort, reports
from pipeline.io import InputError

# --- cohort and reports ---------------------------------------------------------------------------


def test_radgenome_paths_and_unsafe_ids() -> None:
    path = cohort.radgenome_ct_path(Path("vols"), "train_12_a_1")
    assert path == Path("vols/train_12/train_12a/train_12_a_1.nii.gz")
    assert cohort.patient_of("valid_7_b_2") == "valid_7"
    for bad in ("../etc", "a/b", "x..y", ""):
        with pytest.raises(InputError, match="unsafe volume id"):
            cohort.validate_volume_id(bad, "test.csv")


def test_keyword_region_fallback() -> None:
    texts = reports.region_texts_from_keywords(
        "Trachea and both main bronchi are open. A 5 mm nodule is seen in the right lung. "
        "Heart size is normal. No lytic lesion in the bones."
    )
    assert texts["airways"].startswith("Trachea") and "nodule" in texts["lung"]
    assert texts["heart"] == "Heart size is normal." and "lytic" in texts["osseous"]


def test_truncated_ct_names_volume_and_file(tmp_path: Path) -> None:
    from pipeline.io import image_array, read_image

    path = write_image(tmp_path / "train_1_a_1.nii.gz", np.zeros((20, 30, 30), np.int16))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(InputError, match=r"volume train_1_a_1: .*train_1_a_1\.nii\.gz"):
        image_array(read_image(path, "train_1_a_1"), path, "train_1_a_1")


def test_truncated_gzip_is_caught_although_itk_would_zero_fill(tmp_path: Path) -> None:
    """ITK reads a truncated .nii.gz without error (zero-filled voxels); our reader must refuse it."""
    import SimpleITK as sitk

    from pipeline.io import read_image

    ct = np.random.default_rng(0).integers(-1000, 1000, (16, 32, 32)).astype(np.int16)
    path = write_image(tmp_path / "v.nii.gz", ct)
    data = path.read_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(data[: int(len(data) * 0.8)])
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == ct.shape  # ITK: silently
    with pytest.raises(InputError, match=r"volume v: .*cut\.nii\.gz is truncated or corrupt"):
        read_image(cut, "v")
    # a multi-member gzip stream (trailer = last member only) is complete and must still read
    raw = gzip.decompress(data)
    multi = tmp_path / "multi.nii.gz"
    multi.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert (sitk.GetArrayFromImage(read_image(multi, "v")) == ct).all()


def test_real_nifti_files_pass_the_gzip_check(shared_data: Path) -> None:
    from pipeline.io import read_image

    for name in ("example_ct_sm.nii.gz", "example_seg.nii.gz"):
        image = read_image(shared_data / "totalsegmentator" / name, name)
        assert image.GetDimension() == 3
