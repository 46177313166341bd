"""TotalSegmentator backend: run `TotalSegmentator` (when installed) and hand its label map on.

One run per CT: `TotalSegmentator -i <ct> -o <out>/seg_<volume>.nii.gz --ml [args...]` writes one
multi-label map on the CT's grid (class id per voxel, v2 `total` task: 117 classes). The regions
stage maps class id -> name -> channel word with one table lookup per voxel (vocabulary
`totalsegmentator` of `config/regions.yaml`).

Class names come from `label_names` (an `id<TAB>name` file, e.g. TotalSegmentator's
`map_to_binary.py` class map exported) or, by default, from the installed package itself.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pipeline.io import InputError, atomic_output
from pipeline.regions import read_label_names

DEFAULT_COMMAND = "TotalSegmentator"
TASK = "total"


def class_map(label_names: Path | str | None = None, command: str = DEFAULT_COMMAND) -> dict[int, str]:
    """Class id -> name: from a TSV when given, else from the installed TotalSegmentator package.

    Without either, "not installed" is said first: a label-names file alone does not segment anything.
    """
    if label_names:
        return read_label_names(label_names)
    try:
        from totalsegmentator.map_to_binary import class_map as maps  # type: ignore[import-not-found]
    except ImportError:
        if not is_installed(command):
            raise RuntimeError(f"`{shlex.split(command)[0]}` not found: install TotalSegmentator (pip install "
                               "TotalSegmentator) or choose another segmentation.backend; when it runs from "
                               "another environment (segmentation.totalsegmentator.command), also give its class "
                               "map as segmentation.totalsegmentator.label_names (an id<TAB>name file)") from None
        raise RuntimeError("segmentation.totalsegmentator.label_names is not set and the TotalSegmentator "
                           "package is not importable here: give its class map as an id<TAB>name file") from None
    return {int(k): str(v) for k, v in maps[TASK].items()}


def is_installed(command: str = DEFAULT_COMMAND) -> bool:
    return shutil.which(shlex.split(command)[0]) is not None


def run(volume_id: str, ct_path: Path | str, out_file: Path | str, command: str = DEFAULT_COMMAND,
        args: Sequence[str] = ()) -> Path:
    """Segment one CT into `out_file` (written atomically). Errors name the volume and the CT."""
    ct_path, out_file = Path(ct_path), Path(out_file)
    exe = shlex.split(command)
    if not is_installed(command):
        raise RuntimeError(f"`{exe[0]}` not found: install TotalSegmentator (pip install TotalSegmentator) "
                           "or choose another segmentation.backend")
    if not ct_path.is_file():
        raise InputError(f"volume {volume_id}: CT file not found: {ct_path}")
    with atomic_output(out_file) as tmp:
        tmp_nii = tmp.with_name(tmp.name + ".nii.gz")
        cmd = [*exe, "-i", str(ct_path), "-o", str(tmp_nii), "--ml", *args]
        proc = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace")
        if proc.returncode != 0 or not tmp_nii.is_file():
            tmp_nii.unlink(missing_ok=True)
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
            raise InputError(f"volume {volume_id}: TotalSegmentator failed on {ct_path} "
                             f"(exit {proc.returncode}): {' | '.join(tail)}")
        tmp_nii.rename(tmp)
    return out_file
