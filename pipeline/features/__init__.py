"""Features stage: frozen 2D encoder on every slice, R2 / LITA token pooling, mask pooling -> Zarr.

Per volume (MedRegion-CT paper, Sec. 3.2-3.3; cache layout in `pipeline.feature_store`):

1. `preprocess`: HU window -> min-max to [0, 1] -> trilinear resize to (D, H, W) = (32, 256, 256);
   masks resized by area fraction then thresholded; grey -> 3 channels -> the processor's mean / std
   (read from the encoder folder's `preprocessor_config.json`).
2. `encode`: all D slices in batched forwards (`inference_mode`, bf16 autocast on GPU); the
   configured blocks are mask-pooled by forward hooks as they are computed.
3. `pooling`: global = per-slice mean of final-layer patch tokens (D tokens); region = s
   representative slices (R2: largest region-mask area; lita: uniform), each adaptive-average-pooled
   to T / s tokens; mask_pooled = area-normalised mean of each level over the mask; mask_grid =
   occupancy on a small grid.
4. `stage`: one shard, volumes streamed (the next ones read and preprocessed in a thread while the
   encoder runs), written to a temporary Zarr renamed when complete; optional raw-token cache and
   the `pool` command that re-pools it without re-encoding.

`encoder`: offline loading of RAD-DINO (or any Dinov2 folder) with architecture checks, and a
random model with RAD-DINO's exact architecture for benchmarks.
"""

from pipeline.features.config import POOLING_MODES, FeatureConfig, FeatureConfigError
from pipeline.features.encode import encode_prepared, encode_volume
from pipeline.features.encoder import (
    RAD_DINO_ARCH,
    RAD_DINO_MEAN,
    RAD_DINO_STD,
    EncoderError,
    build_demo_encoder,
    check_architecture,
    demo_encoder_config,
    encoder_provenance,
    load_encoder,
    processor_normalisation,
    resolve_encoder,
)
from pipeline.features.pooling import global_tokens, mask_pool, pool_region, pool_tokens, select_slices
from pipeline.features.preprocess import (
    PreparedVolume,
    binarise,
    mask_fraction,
    patch_occupancy,
    prepare_volume,
    preprocess_ct,
)
from pipeline.features.stage import CODE_VERSION, main, pool_shard, prefetched, run_shard

__all__ = [
    "CODE_VERSION",
    "POOLING_MODES",
    "RAD_DINO_ARCH",
    "RAD_DINO_MEAN",
    "RAD_DINO_STD",
    "EncoderError",
    "FeatureConfig",
    "FeatureConfigError",
    "PreparedVolume",
    "binarise",
    "build_demo_encoder",
    "check_architecture",
    "demo_encoder_config",
    "encode_prepared",
    "encode_volume",
    "encoder_provenance",
    "global_tokens",
    "load_encoder",
    "main",
    "mask_fraction",
    "mask_pool",
    "patch_occupancy",
    "pool_region",
    "pool_shard",
    "pool_tokens",
    "prefetched",
    "prepare_volume",
    "preprocess_ct",
    "processor_normalisation",
    "resolve_encoder",
    "run_shard",
    "select_slices",
]
