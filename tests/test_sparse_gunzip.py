"""The sparse inflater (pipeline/_sparse_gunzip.c): the same bytes as zlib for every kind of deflate
stream, exact extents, a buffer left all zero by clear(), and errors (never a crash) on bad input."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, write_box_masks, write_image

from pipeline import _sparse_gunzip as sg  # a failed C build must fail these tests, not skip them
from pipeline import regions
from pipeline.io import InputError, SparseInflater

TABLE = regions.LabelTable.load(REPO / "config" / "regions.yaml")
HEADER = 352
STRATEGIES = (zlib.Z_DEFAULT_STRATEGY, zlib.Z_FILTERED, zlib.Z_HUFFMAN_ONLY, zlib.Z_RLE, zlib.Z_FIXED)


def _voxels(kind: str, shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    nz, ny, nx = shape
    if kind == "random bytes":
        return rng.integers(0, 256, shape, dtype=np.uint8)
    if kind == "sparse 0/1":
        return (rng.random(shape) < 0.01).astype(np.uint8)
    if kind == "values 0..3":
        return ((rng.random(shape) < 0.05) * rng.integers(1, 4, shape)).astype(np.uint8)
    if kind == "empty":
        return np.zeros(shape, np.uint8)
    if kind == "all ones":  # long runs of a non-zero byte: coded like zero runs, must really be written
        return np.ones(shape, np.uint8)
    m = np.zeros(shape, np.uint8)  # a box, and a last voxel: runs of ones longer than 258 and a lone byte
    m[nz // 4 : nz // 2 + 1, ny // 3 : ny // 2 + 1, nx // 5 :] = 1
    m[-1, -1, -1] = 1
    return m


def _inflate(data: bytes, size: int, vox: int, shape: tuple[int, int, int]):
    nz, ny, nx = shape
    out = np.zeros(size, np.uint8)
    dirty = np.zeros(nz * ny, np.uint8)
    return sg.gunzip(data, out, vox, nx, ny, dirty), out, dirty


def _check(raw: bytes, data: bytes, vox: int, shape: tuple[int, int, int]) -> None:
    (status, produced, head_end, value_or, box), out, dirty = _inflate(data, len(raw), vox, shape)
    assert (status, produced) == (0, len(raw))
    assert out.tobytes() == raw
    a = np.frombuffer(raw, np.uint8)
    head = np.flatnonzero(a[:vox])
    assert head_end == (head[-1] + 1 if head.size else 0)
    v = a[vox:].reshape(shape)
    assert value_or == int(np.bitwise_or.reduce(v.ravel()))
    assert (dirty.astype(bool) == v.reshape(-1, shape[2]).any(axis=1)).all()
    nzs = np.nonzero(v)
    expected = tuple(int(f(i)) for i in nzs for f in (np.min, lambda i: np.max(i) + 1)) if nzs[0].size else (0,) * 6
    assert box == expected
    nx, ny = shape[2], shape[1]
    sg.clear(out, vox, nx, ny, dirty, head_end)
    assert not out.any() and not dirty.any()


@pytest.mark.parametrize("shape", [(1, 1, 1), (4, 5, 7), (6, 40, 300), (3, 4, 700)])
@pytest.mark.parametrize("kind", ["random bytes", "sparse 0/1", "values 0..3", "empty", "all ones", "box"])
def test_same_bytes_and_extent_as_zlib_for_every_stream_kind(shape: tuple[int, int, int], kind: str) -> None:
    rng = np.random.default_rng(len(kind) * 7 + shape[2])
    voxels = _voxels(kind, shape, rng).tobytes()
    for vox, header in ((HEADER, rng.integers(1, 256, HEADER, dtype=np.uint8).tobytes()), (0, b"")):
        raw = header + voxels
        for level in (0, 1, 6, 9):  # 0: stored blocks
            for strategy in STRATEGIES:  # fixed and dynamic Huffman blocks, run-length matches
                c = zlib.compressobj(level, zlib.DEFLATED, 31, 9, strategy)
                _check(raw, c.compress(raw) + c.flush(), vox, shape)
        # two gzip members (valid gzip), and zero padding after the last one
        half = len(raw) // 2
        _check(raw, gzip.compress(raw[:half]) + gzip.compress(raw[half:]) + bytes(7), vox, shape)


def test_truncated_or_corrupt_streams_give_a_status_and_clear_restores_zeros() -> None:
    rng = np.random.default_rng(0)
    shape = (6, 40, 300)
    raw = bytes(range(1, 256)) + bytes(HEADER - 255) + _voxels("box", shape, rng).tobytes()
    data = gzip.compress(raw)
    seen = set()
    for cut in range(0, len(data), 7):
        (status, produced, head_end, _, _), out, dirty = _inflate(data[:cut], len(raw), HEADER, shape)
        assert status != 0 or produced < len(raw)
        seen.add(status)
        sg.clear(out, HEADER, shape[2], shape[1], dirty, head_end)
        assert not out.any()
    for _ in range(1500):
        bad = bytearray(data)
        bad[rng.integers(10, len(bad))] ^= 1 << int(rng.integers(8))
        (status, produced, head_end, _, _), out, dirty = _inflate(bytes(bad), len(raw), HEADER, shape)
        assert status != 0 or out.tobytes() == raw  # a flip in unused padding bits changes nothing
        seen.add(status)
        sg.clear(out, HEADER, shape[2], shape[1], dirty, head_end)
        assert not out.any()
    assert {1, 2, 4} <= seen  # truncated, corrupt, CRC: each reached
    (status, *_), _, _ = _inflate(b"\x1f\x8c" + data[2:], len(raw), HEADER, shape)
    assert status == 5


def test_output_longer_than_the_buffer_is_refused() -> None:
    shape = (2, 3, 4)
    raw = bytes(HEADER + 2 * 3 * 4)
    (status, *_), _, _ = _inflate(gzip.compress(raw + b"\x01"), len(raw), HEADER, shape)
    assert status == 3


def test_layout_arguments_are_checked() -> None:
    out, dirty = np.zeros(HEADER + 24, np.uint8), np.zeros(6, np.uint8)
    with pytest.raises(ValueError, match="rows"):
        sg.gunzip(gzip.compress(bytes(10)), out, HEADER, 4, 4, dirty)  # 6 rows are not whole slices of 4
    with pytest.raises(ValueError):
        sg.clear(out, HEADER, 4, 3, dirty, HEADER + 1)


def test_sparse_inflater_errors_name_volume_and_file(tmp_path: Path) -> None:
    shape = (3, 4, 5)
    raw = bytes(HEADER) + np.ones(shape, np.uint8).tobytes()
    inflater = SparseInflater()
    view, extent = inflater.inflate(gzip.compress(raw), len(raw), HEADER, shape, tmp_path / "m.nii.gz", "v7")
    assert extent.value_or == 1 and extent.box == (0, 3, 0, 4, 0, 5) and view[HEADER:].all()
    with pytest.raises(InputError, match=r"volume v7: .*m\.nii\.gz is truncated"):
        inflater.inflate(gzip.compress(raw)[:-9], len(raw), HEADER, shape, tmp_path / "m.nii.gz", "v7")
    empty, extent = inflater.inflate(gzip.compress(bytes(len(raw))), len(raw), HEADER, shape, tmp_path / "e", "v7")
    assert extent.box is None and not empty.any()  # the previous file's rows were zeroed first


def test_regions_merge_is_the_same_with_sparse_libdeflate_and_zlib(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.io.deflate as io

    shape = (12, 30, 41)
    names = ["right lung upper lobe", "left lung lower lobe", "left heart ventricle", "liver", "lung effusion",
             "lung nodule", "rib 3", "trachea", "left kidney", "spleen"]
    ct = write_box_masks(tmp_path, shape, names, seed=3, start_max=8, length_max=(5, 20, 30))
    write_image(tmp_path / "seg" / "spleen.nii.gz", np.zeros(shape, np.uint8))  # an empty mask
    runs = {}
    for decoder in ("sparse", "libdeflate", "zlib"):
        if decoder != "sparse":
            monkeypatch.setattr(io, "_SPARSE", None)
        if decoder == "zlib":
            monkeypatch.setattr(io, "_LIBDEFLATE", None)
        monkeypatch.setattr(regions.workspace, "_POOL", {})  # fresh workspaces for this decoder
        runs[decoder] = regions.merge_volume("v", ct, tmp_path / "seg", TABLE, threads=2)
    for decoder in ("libdeflate", "zlib"):
        assert (runs[decoder].labels == runs["sparse"].labels).all()
        assert runs[decoder].boxes == runs["sparse"].boxes
    assert runs["sparse"].labels.any()


def test_fuzzed_inputs_end_in_a_status_code() -> None:
    from sparse_gunzip_fuzz import fuzz

    statuses = fuzz(sg, seed=11, n=600)
    assert set(statuses) == {0, 1, 2, 3, 4, 5}  # every outcome reached, none a crash


def test_fuzzed_inputs_under_address_sanitizer(tmp_path: Path) -> None:
    """The same fuzzing on a build with AddressSanitizer and UBSan: any read or write outside the
    buffers, or undefined behaviour, aborts the subprocess."""
    import shutil
    import subprocess
    import sys
    import sysconfig

    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("no gcc")
    asan = subprocess.run([gcc, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    if not Path(asan).is_file():
        pytest.skip("no libasan")
    so = tmp_path / "_sparse_gunzip_asan.so"
    subprocess.run([gcc, "-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                    "-fno-omit-frame-pointer", "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
                    str(REPO / "pipeline" / "_sparse_gunzip.c"), "-o", str(so)], check=True)
    env = {**__import__("os").environ, "LD_PRELOAD": asan, "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sparse_gunzip_fuzz.py"), str(so), "5", "1500"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(0," in proc.stdout and "(2," in proc.stdout


def test_decoder_choice_gives_the_same_masks_and_is_recorded(tmp_path: Path) -> None:
    import pandas as pd

    from pipeline import io

    shape = (9, 20, 27)
    names = ["right lung upper lobe", "trachea", "liver", "lung nodule", "rib 3"]
    ct = write_box_masks(tmp_path, shape, names, seed=5, start_max=6, length_max=(5, 12, 20))
    manifest = pd.DataFrame([{"volume_id": "v", "patient_id": "p", "split": "train", "shard": 0, "ct_path": str(ct),
                              "mask_dir": str(tmp_path / "seg"), "mask_source": "precomputed", "findings": "",
                              "impressions": ""}])
    expected = {"auto": "sparse+libdeflate", "sparse": "sparse+libdeflate", "libdeflate": "libdeflate", "zlib": "zlib"}
    labels = {}
    try:
        for decoder, used in expected.items():
            qc = regions.run_shard(manifest, 0, TABLE, tmp_path / f"{decoder}.zarr", tmp_path / f"{decoder}.parquet",
                                   decoder=decoder)
            assert list(qc["decoder"]) == [used]
            group = regions.open_masks(tmp_path / f"{decoder}.zarr")
            assert group.attrs["decoder"] == used
            labels[decoder] = regions.read_labels(group["v"])
    finally:
        io.set_decoder("auto")
    assert labels["auto"].any()
    for decoder in expected:
        assert np.array_equal(labels[decoder], labels["auto"]), decoder


def test_an_unavailable_decoder_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.io import deflate as io

    monkeypatch.setattr(io, "LIBDEFLATE_SYMBOLS", io.LIBDEFLATE_SYMBOLS + ("libdeflate_no_such_function",))
    lib, problem = io._load_libdeflate()  # a release that hides a symbol: detected at import, not mid-run
    assert lib is None and "libdeflate_no_such_function" in problem
    monkeypatch.setattr(io, "_LIBDEFLATE", None)
    monkeypatch.setattr(io, "LIBDEFLATE_PROBLEM", problem)
    with pytest.raises(RuntimeError, match="libdeflate_no_such_function"):
        io.set_decoder("libdeflate")
    assert io.set_decoder("auto") == "sparse+zlib"  # auto falls back, and says which decoder it uses
    monkeypatch.setattr(io, "_SPARSE", None)
    with pytest.raises(RuntimeError, match="not built"):
        io.set_decoder("sparse")
    assert io.set_decoder("auto") == "zlib"
    with pytest.raises(ValueError):
        io.set_decoder("gzip")
