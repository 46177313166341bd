"""Atomic writes: every output appears complete or not at all.

A writer gets a temporary sibling of its output, writes there, and the temporary is renamed into
place only when the writing succeeded (`atomic_output`); a failure removes it, and what a killed
earlier attempt left (`.<name>.tmp-<pid>` of a process that no longer runs) is removed by the rerun.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd


def atomic_path(path: Path) -> Path:
    """The temporary sibling a file is written to before being renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.<name>.tmp-<pid>*` siblings of `path` left by writers that no longer run (killed jobs).

    A job killed with SIGKILL cannot clean up after itself; its rerun (another pid) removes what it
    left. A sibling whose process still runs on this machine is left alone.
    """
    prefix = f".{path.name}.tmp-"
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        if not p.name.startswith(prefix):
            continue
        digits = p.name[len(prefix):].split(".", 1)[0]
        if digits.isdigit() and int(digits) != os.getpid() and not _pid_alive(int(digits)):
            try:
                _remove(p)
                removed.append(p)
            except OSError:
                pass  # removed by another rerun at the same moment
    return removed


@contextlib.contextmanager
def atomic_output(path: Path | str, temporary: Path | str | None = None) -> Iterator[Path]:
    """Yield a temporary path; on success rename it to `path`, on failure remove it.

    Works for files and directories (e.g. a Zarr store), so an interrupted job never leaves an
    output that looks complete; what a killed earlier attempt left is removed first.

    `temporary` names the temporary path explicitly, for writers that need a fixed name: several
    processes writing into one folder (training ranks into one checkpoint folder), or a name others
    look for (the feature store's `.shard-<k>.zarr.tmp`). It must be a sibling of `path` (same file
    system, so the rename is atomic). Whatever is there on entry is the leftover of an interrupted
    run and is removed; only the process that enters `atomic_output` renames or removes it, so other
    writers into it must write between that process's entry and its exit (the caller synchronises,
    e.g. a barrier after entering and one before leaving the block). By default the temporary is
    `atomic_path(path)`, which holds this process's id.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = atomic_path(path) if temporary is None else Path(temporary)
    if tmp.parent.resolve() != path.parent.resolve():
        raise ValueError(f"the temporary {tmp} of {path} must be in the same folder")
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if (path.is_dir() and not path.is_symlink()) or (tmp.is_dir() and (path.exists() or path.is_symlink())):
        _remove(path)  # a folder cannot replace another path in one rename; a file over a file can
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def write_parquet(df: pd.DataFrame, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        df.to_parquet(tmp, index=False)


def write_json(obj: Any, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")
