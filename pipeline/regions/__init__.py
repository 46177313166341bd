"""Regions stage: per-structure masks -> one bit-packed uint32 channel array per volume.

Channels (`pipeline.constants.CHANNELS`, bit i = channel i): the 6 regions, the 3 lesions and the 12
attribute structures. The label table `config/regions.yaml` gives each structure name of a vocabulary
(`radgenome` = SAT terms, `totalsegmentator`) its channel bit word.

How a volume is merged
- Each structure file is read exactly once; names the table marks `unused` are not opened at all,
  names it does not know are reported (QC column `unknown`), never silently dropped.
- Files with the same bytes (apart from the gzip time stamp) hold the same voxels: each such group
  (e.g. all the empty masks of a volume) is decoded once, with the union of its channel words.
- Masks on the CT's own grid (NIfTI header geometry identical to the CT's) take the fast path. A
  uint8 .nii.gz is inflated by the sparse inflater (`pipeline.io.SparseInflater`, C source
  pipeline/_sparse_gunzip.c) into a reused all-zero per-thread buffer: it writes only the non-zero
  bytes (a mask's zero runs, most of its 12 MB at RadGenome size, are skipped, CRC still checked)
  and returns the OR of the voxel values (0/1 check) and the bounding box, so the mask is never
  read again to check it or find it. Other dtypes (or without the C extension) are inflated by
  libdeflate and one pass over the voxels does the check and finds the slices, and their slab the
  (y, x) footprint. Then only the mask's rows are OR-ed into uint8 accumulator planes, one per byte
  of the channel word (a lookup of the word's bytes, not a loop over labels or channels per voxel),
  each under its own lock.
  Threads decode different files at once (the decoder and numpy release the GIL). The planes are
  interleaved into the uint32 array in blocks of Z_CHUNK slices on the job's threads; in a shard
  job each block is zstd-compressed as its zarr chunk, and the attributes stage's channels
  counted, while it is in cache.
- Any other mask goes through SimpleITK: a mask on a different grid of the same physical space is
  resampled (nearest neighbour) onto the CT grid and noted (QC column `resampled`); one that does not
  overlap the CT is an error for that volume.
- A label map (TotalSegmentator `--ml` output: one file, voxel = class id) is turned into channel
  words with one table lookup per voxel.

Orientation: masks are merged on the CT's own grid, then the packed array is brought to the canonical
orientation (`pipeline.orientation`: LPS, ITK's identity direction; an exact transpose / flip, once per
volume; a CT already in LPS is left as it is). The features stage turns the CT the same way.

Output `results/masks/shard-<k>.zarr`: array `<volume_id>` (z, y, x) uint32 on the CT's grid in the
canonical orientation, chunked by 16 slices (zstd level ZSTD_LEVEL), attributes `spacing`, `origin`,
`direction` (of that grid, SimpleITK x, y, z order), `channels_available` (channels at least one input structure maps to; a
backend without heart chambers leaves those out) and, for masks, `channel_boxes` (each non-empty
channel's [z0, z1, y0, y1, x0, x1]) and `channel_voxels` (voxel count of each MEASURED channel);
group attributes `channels`, `table_version`, `orientation` ("LPS"), `decoder` (the mask decoder used:
`sparse+libdeflate`, `sparse+zlib`, `libdeflate` or `zlib`; config `regions.decoder`), `volume_ids`, `complete`.
QC `results/qc/regions/shard-<k>.parquet`: one row per volume: `volume_id`, `stage`, `status`
(ok / error / skipped), `error`, `note`, `n_files`, `n_used`, `unknown`, `resampled`, `decoder`; and a picture per
sampled volume under `results/qc/regions/shard-<k>/` (axial and coronal slices, region overlays).

The package, by part: `table` (the label table, vocabularies), `grid` (the CT's grid from its header),
`workspace` (pooled per-thread inflaters and accumulator planes, the thread pool), `merge` (one
volume's structure files or label map -> the packed array), `store` (the masks store's chunk writer
and reader), `qc_pictures`, `stage` (one shard, `RegionsSettings`) and `cli` (`python -m
pipeline.regions`; the stage's settings arrive as one `--params-json` object). The names other
modules use are re-exported here.
"""

from pipeline.constants import CHANNELS
from pipeline.regions.cli import main
from pipeline.regions.grid import DEFAULT_MEMORY_CAP_GB, CtGrid, bytes_per_voxel, read_ct_grid, read_ct_header
from pipeline.regions.merge import (
    MASK_SUFFIX,
    MASK_SUFFIXES,
    MEASURED,
    MaskSource,
    VolumeMasks,
    describe_masks,
    is_labelmap_path,
    merge_labelmap,
    merge_volume,
    read_label_names,
    structure_files,
    structure_name,
)
from pipeline.regions.qc_pictures import qc_picture, sample_for_pictures
from pipeline.regions.stage import QC_COLUMNS, RegionsSettings, process_volume, run_shard, to_canonical
from pipeline.regions.store import Z_CHUNK, ZSTD_LEVEL, open_masks, read_labels, write_volume
from pipeline.regions.table import (
    AUTO_VOCABULARY,
    DEFAULT_VOCABULARY,
    LabelTable,
    Vocabulary,
    channel_names,
    check_known,
    detect_vocabulary,
    unpack_channel,
)
from pipeline.regions.workspace import N_BYTES

__all__ = [
    "AUTO_VOCABULARY", "CHANNELS", "DEFAULT_MEMORY_CAP_GB", "DEFAULT_VOCABULARY", "MASK_SUFFIX", "MASK_SUFFIXES",
    "MEASURED", "N_BYTES", "QC_COLUMNS", "ZSTD_LEVEL", "Z_CHUNK", "CtGrid", "LabelTable", "MaskSource",
    "RegionsSettings", "Vocabulary", "VolumeMasks", "bytes_per_voxel", "channel_names", "check_known",
    "describe_masks", "detect_vocabulary", "is_labelmap_path", "main", "merge_labelmap", "merge_volume",
    "open_masks", "process_volume", "qc_picture", "read_ct_grid", "read_ct_header", "read_label_names",
    "read_labels", "run_shard", "sample_for_pictures", "structure_files", "structure_name", "to_canonical",
    "unpack_channel", "write_volume",
]
