"""Small I/O helpers every stage uses, by job:

- `pipeline.io.atomic`: atomic writes (`atomic_output`, `write_parquet`, `write_json`);
- `pipeline.io.nifti`: CT / mask / NIfTI header reading with clear errors;
- `pipeline.io.deflate`: fast mask decoding (libdeflate through ctypes, the compiled sparse inflater
  `pipeline._sparse_gunzip`, zlib) and the choice among them;
- `pipeline.io.errors`: `InputError`, raised for bad input data;
- `pipeline.io.log`: `setup_logging`.

The public names are re-exported here: `from pipeline.io import X` works for all of them. Module
state (the decoder in use, the libdeflate and sparse-inflater handles) lives in
`pipeline.io.deflate`; patch it there.
"""

from __future__ import annotations

from pipeline.io.atomic import (
    atomic_output,
    atomic_path,
    remove_stale_temporaries,
    write_json,
    write_parquet,
)
from pipeline.io.deflate import (
    DECODERS,
    LIBDEFLATE_PROBLEM,
    LIBDEFLATE_SYMBOLS,
    MAX_DEFLATE_RATIO,
    Inflater,
    MaskExtent,
    SparseInflater,
    decoder_in_use,
    gzip_decoder_name,
    inflate_into,
    set_decoder,
)
from pipeline.io.errors import InputError
from pipeline.io.log import setup_logging
from pipeline.io.nifti import (
    DEFAULT_MAX_IMAGE_GB,
    NiftiHeader,
    check_complete,
    check_finite,
    check_gzip_complete,
    check_memory,
    geometry,
    image_array,
    image_nbytes,
    max_image_bytes,
    nifti_geometry_problem,
    nifti_voxels,
    parse_nifti_header,
    read_header_info,
    read_image,
    read_nifti_header,
    verify_gzip_stream,
)

__all__ = [
    "DECODERS", "DEFAULT_MAX_IMAGE_GB", "LIBDEFLATE_PROBLEM", "LIBDEFLATE_SYMBOLS", "MAX_DEFLATE_RATIO",
    "Inflater", "InputError", "MaskExtent", "NiftiHeader", "SparseInflater", "atomic_output", "atomic_path",
    "check_complete", "check_finite", "check_gzip_complete", "check_memory", "decoder_in_use", "geometry",
    "gzip_decoder_name", "image_array", "image_nbytes", "inflate_into", "max_image_bytes",
    "nifti_geometry_problem", "nifti_voxels", "parse_nifti_header", "read_header_info", "read_image",
    "read_nifti_header", "remove_stale_temporaries", "set_decoder", "setup_logging", "verify_gzip_stream",
    "write_json", "write_parquet",
]
