"""pipeline.io.atomic_output: the default per-process temporary and an explicit fixed one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline.io import atomic_output, atomic_path


def test_default_temporary_is_renamed_on_success_and_removed_on_failure(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "a.json"
    with atomic_output(out) as tmp:
        assert tmp == atomic_path(out) and str(os.getpid()) in tmp.name
        tmp.write_text("1")
    assert out.read_text() == "1"
    with pytest.raises(KeyError), atomic_output(out) as tmp:
        tmp.write_text("2")
        raise KeyError
    assert out.read_text() == "1" and not tmp.exists()


def test_explicit_temporary_is_used_cleared_first_and_renamed(tmp_path: Path) -> None:
    out = tmp_path / "shard-3.zarr"
    fixed = tmp_path / ".shard-3.zarr.tmp"
    (fixed / "leftover").mkdir(parents=True)  # what an interrupted run left
    with atomic_output(out, temporary=fixed) as tmp:
        assert tmp == fixed and not fixed.exists()
        (tmp / "rank-0").mkdir(parents=True)
        (tmp / "rank-1").mkdir()  # another writer into the same fixed folder
    assert sorted(p.name for p in out.iterdir()) == ["rank-0", "rank-1"] and not fixed.exists()
    with atomic_output(out, temporary=fixed) as tmp:  # an existing output folder is replaced
        (tmp / "new").mkdir(parents=True)
    assert [p.name for p in out.iterdir()] == ["new"]
    with pytest.raises(RuntimeError), atomic_output(out, temporary=fixed) as tmp:
        tmp.mkdir()
        raise RuntimeError
    assert not fixed.exists() and [p.name for p in out.iterdir()] == ["new"]


def test_explicit_temporary_must_be_a_sibling(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="same folder"), atomic_output(tmp_path / "a", tmp_path / "other" / "a"):
        pass
