"""One shard of the regions stage: every volume merged, turned to the canonical grid and written to
the masks store, with its QC row; the stage's settings (`RegionsSettings`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

from pipeline.constants import CHANNELS
from pipeline.io import (
    DECODERS,
    LIBDEFLATE_PROBLEM,
    InputError,
    atomic_output,
    read_header_info,
    set_decoder,
    setup_logging,
    write_parquet,
)
from pipeline.orientation import CANONICAL, Reorientation, reorientation
from pipeline.regions import store, workspace
from pipeline.regions.grid import DEFAULT_MEMORY_CAP_GB, CtGrid
from pipeline.regions.merge import VolumeMasks, describe_masks, merge_labelmap, merge_volume
from pipeline.regions.qc_pictures import _picture_dir, qc_picture, sample_for_pictures
from pipeline.regions.store import write_volume
from pipeline.regions.table import DEFAULT_VOCABULARY, LabelTable

QC_COLUMNS = ("volume_id", "stage", "status", "error", "note", "n_files", "n_used", "unknown", "resampled", "decoder")


@dataclass(frozen=True)
class RegionsSettings:
    """The stage's settings, passed as one `--params-json` object: `qc_pictures` and `decoder` are the
    config's `regions` section, `memory_cap_gb` the cap on one CT (the workflow passes
    `segmentation.memory_cap_gb`). Defaults are the schema's."""

    qc_pictures: int = 1  # volumes per shard drawn in the QC picture
    decoder: str = "auto"  # mask decoder (pipeline.io.DECODERS)
    memory_cap_gb: float = DEFAULT_MEMORY_CAP_GB  # refuse a CT whose merge would need more

    def __post_init__(self) -> None:
        if isinstance(self.qc_pictures, bool) or not isinstance(self.qc_pictures, int) or self.qc_pictures < 0:
            raise ValueError(f"regions.qc_pictures must be an integer >= 0, not {self.qc_pictures!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"regions.decoder {self.decoder!r} is not one of {', '.join(DECODERS)}")
        if isinstance(self.memory_cap_gb, bool) or not isinstance(self.memory_cap_gb, (int, float)) \
                or not self.memory_cap_gb >= 0:
            raise ValueError(f"segmentation.memory_cap_gb must be a number >= 0 (0: no cap), not {self.memory_cap_gb!r}")
        object.__setattr__(self, "memory_cap_gb", float(self.memory_cap_gb))  # 8 or 8.0 in the JSON


def _qc_row(volume_id: str, status: str, error: str = "", **extra: object) -> dict[str, object]:
    row: dict[str, object] = {"volume_id": volume_id, "stage": "regions", "status": status, "error": error,
                              "note": "", "n_files": 0, "n_used": 0, "unknown": [], "resampled": []}
    row.update(extra)
    return row


def _segment_rows(manifest: pd.DataFrame, segment: pd.DataFrame | None, shard: int) -> list[dict[str, object]]:
    """Per volume: CT path and where its masks are: the segment table's row, or else the manifest's
    `mask_dir` / `mask_label_names`, described (format, vocabulary) when the volume is merged."""
    from pipeline.cohort import validate_volume_id

    rows = manifest[manifest["shard"] == shard]
    seg = segment.set_index("volume_id") if segment is not None and len(segment) else None
    out = []
    for row in rows.itertuples(index=False):
        names_file = getattr(row, "mask_label_names", "")
        item = {"volume_id": row.volume_id, "ct_path": row.ct_path, "mask_path": getattr(row, "mask_dir", ""),
                "mask_format": "folder", "vocabulary": DEFAULT_VOCABULARY, "label_names": "",
                "status": "ok", "error": "", "describe": True,
                "label_names_file": names_file if isinstance(names_file, str) else ""}
        if seg is not None and row.volume_id in seg.index:
            item["describe"] = False
            s = seg.loc[row.volume_id]
            for key in ("mask_path", "mask_format", "vocabulary", "label_names", "status", "error"):
                if key in s.index and isinstance(s[key], str) and (s[key] or key in ("error", "label_names")):
                    item[key] = s[key]
            if "mask_path" not in s.index and "mask_dir" in s.index:
                item["mask_path"] = s["mask_dir"]
        try:
            validate_volume_id(row.volume_id, "manifest")
        except InputError as exc:
            item["status"], item["error"] = "invalid", str(exc)
        out.append(item)
    return out


def process_volume(item: dict[str, object], table: LabelTable, threads: int,
                   memory_cap_bytes: int | None, out: np.ndarray | None = None, encode: bool = False) -> VolumeMasks:
    """One volume's packed masks, on the canonical (LPS) grid (`to_canonical`)."""
    vid, ct_path = str(item["volume_id"]), Path(str(item["ct_path"]))
    if item.get("describe"):  # no segment table row: the manifest's masks, their layout and vocabulary found here
        src = describe_masks(vid, Path(str(item["mask_path"])), str(item.get("label_names_file") or ""), table)
        item = {**item, "mask_format": src.mask_format, "vocabulary": src.vocabulary, "label_names": src.label_names}
    if encode:
        header = read_header_info(ct_path, vid)  # a CT that is not 3D is refused, with its reason, by the merge
        if header.GetDimension() == 3 and not _turn(header.GetDirection(), ct_path).identity:
            encode = False  # the chunks are made after the array is turned
    if item["mask_format"] == "labelmap":
        vm = merge_labelmap(vid, ct_path, Path(str(item["mask_path"])),
                            {int(k): v for k, v in json.loads(str(item["label_names"])).items()},
                            table, str(item["vocabulary"]), memory_cap_bytes)
    else:
        vm = merge_volume(vid, ct_path, Path(str(item["mask_path"])), table, threads, str(item["vocabulary"]),
                          memory_cap_bytes, out, encode)
    return to_canonical(vm, ct_path)


def _turn(direction: Sequence[float], ct_path: Path | str) -> Reorientation:
    try:
        return reorientation(direction)
    except ValueError as exc:
        raise InputError(f"{ct_path}: {exc}") from None


def to_canonical(vm: VolumeMasks, ct_path: Path | str) -> VolumeMasks:
    """The volume's masks on the canonical grid (`pipeline.orientation`: LPS, identity direction).

    Masks are merged on the CT's own grid (the fast path reads them as stored); this moves the packed
    array once per volume, an exact transpose / flip, with its geometry and channel boxes. A CT already
    in LPS (the demo, RadGenome) is left as it is: the same array, chunks and attributes."""
    turn = _turn(vm.grid.direction, ct_path)
    if turn.identity:
        return vm
    shape = vm.labels.shape
    size, spacing, origin, direction = turn.grid(vm.grid.size, vm.grid.spacing, vm.grid.origin, vm.grid.direction)
    grid = CtGrid(size, spacing, origin, direction, None)  # type: ignore[arg-type]
    boxes = None if vm.boxes is None else {c: turn.box(b, shape) for c, b in vm.boxes.items()}
    return VolumeMasks(np.ascontiguousarray(turn.array(vm.labels)), grid, vm.unknown, vm.resampled, vm.n_files,
                       vm.n_used, vm.available, boxes, None, vm.voxels)  # chunks are compressed again when written


def run_shard(
    manifest: pd.DataFrame,
    shard: int,
    table: LabelTable,
    out_zarr: Path,
    out_qc: Path,
    on_error: str = "fail",
    threads: int = 1,
    segment: pd.DataFrame | None = None,
    pictures: Path | None = None,
    n_pictures: int = 1,
    memory_cap_gb: float = DEFAULT_MEMORY_CAP_GB,
    decoder: str = "auto",
) -> pd.DataFrame:
    log = setup_logging()
    used = set_decoder(decoder)
    if decoder == "auto" and "libdeflate" not in used and LIBDEFLATE_PROBLEM:
        log.warning("libdeflate unavailable (%s): files the sparse inflater does not take are inflated by zlib",
                    LIBDEFLATE_PROBLEM)
    log.info("mask decoder: %s (regions.decoder: %s)", used, decoder)
    # A shard starts with no buffers, as a workflow job (one process per shard) does: reuse from an
    # earlier call in the same process would flatter in-process benchmarks, not help the workflow.
    with workspace._POOL_LOCK:
        workspace._POOL.clear()
        store._EDGE.clear()
    items = _segment_rows(manifest, segment, shard)
    cap = int(memory_cap_gb * 2**30) if memory_cap_gb else None
    qc: list[dict[str, object]] = []
    picture_ids = set(sample_for_pictures([str(i["volume_id"]) for i in items if i["status"] == "ok"], n_pictures))
    with atomic_output(out_zarr) as tmp_zarr, _picture_dir(pictures) as tmp_pics:
        group = zarr.open_group(str(tmp_zarr), mode="w", zarr_format=3)
        done: list[str] = []
        out_buffer: np.ndarray | None = None  # the output array, reused from volume to volume of this shard
        for i, item in enumerate(items, 1):
            vid = str(item["volume_id"])
            if item["status"] == "invalid":
                if on_error != "skip":
                    raise InputError(str(item["error"]))
                log.error("%s (skipped)", item["error"])
                qc.append(_qc_row(vid, "error", str(item["error"])))
                continue
            if item["status"] != "ok":  # failed in the segment stage (on_error: skip): recorded there
                log.error("volume %s skipped: %s", vid, item["error"])
                qc.append(_qc_row(vid, "skipped", f"segment: {item['error']}"))
                continue
            t0 = time.perf_counter()
            try:
                vm = process_volume(item, table, threads, cap, out_buffer, encode=True)
                out_buffer = vm.labels  # reused for the next volume of the same size
                write_volume(group, vid, vm, tmp_zarr, max(threads, 1))
                if tmp_pics is not None and vid in picture_ids:
                    qc_picture(Path(str(item["ct_path"])), vm.labels, vm.grid, vid, tmp_pics / f"{vid}.png")
            except InputError as exc:
                if on_error != "skip":
                    raise
                log.error("%s (skipped)", exc)
                qc.append(_qc_row(vid, "error", str(exc)))
                continue
            done.append(vid)
            if vm.unknown:
                log.warning("volume %s: %d names not in the label table (%s vocabulary): %s", vid,
                            len(vm.unknown), item["vocabulary"], vm.unknown)
            note = "resampled to the CT grid: " + ", ".join(vm.resampled) if vm.resampled else ""
            qc.append(_qc_row(vid, "ok", note=note, n_files=vm.n_files, n_used=vm.n_used, unknown=vm.unknown,
                              resampled=vm.resampled))
            log.info("[%d/%d] %s: %d structure files (%d used) merged in %.2f s", i, len(items), vid,
                     vm.n_files, vm.n_used, time.perf_counter() - t0)
        group.update_attributes({"channels": list(CHANNELS), "table_version": table.version,  # one write
                                 "orientation": CANONICAL, "decoder": used, "volume_ids": done,
                                 "complete": True})
    qc_df = pd.DataFrame(qc, columns=list(QC_COLUMNS)).assign(decoder=used)
    write_parquet(qc_df, out_qc)
    return qc_df
