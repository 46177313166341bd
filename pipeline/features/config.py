"""Settings of the features stage (the `features` section of the config), validated once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from pipeline.constants import REGIONS

POOLING_MODES = ("r2", "lita")


class FeatureConfigError(ValueError):
    """The features settings contradict each other or the encoder."""


@dataclass(frozen=True)
class FeatureConfig:
    """How a volume becomes cached features.

    - `input_size` (D, H, W): every CT is resampled to D slices of H x W (trilinear); a volume with
      fewer than D slices is interpolated up along z, never padded, so all volumes have D slices.
    - `hu_window` (lo, hi): HU clip, then min-max to [0, 1] with the window's own bounds (the paper's
      "consistent min-max normalisation": the same mapping for every volume, so a constant CT cannot
      divide by zero). Default [-1000, 1000] HU: air to cortical bone, lung and soft tissue both in.
    - `channel_windows`: one (lo, hi) HU window per encoder input channel (e.g. lung, mediastinal,
      bone), each clipped and min-max scaled like `hu_window`; None: `hu_window` in every channel
      (the paper's grey input, as RAD-DINO was trained on).
    - `layers`: encoder blocks whose outputs are mask-pooled (hidden_states[l], 1-based, not
      layer-normed); RAD-DINO: 3, 6, 9, 12.
    - `pooling` r2 | lita, `slices` s (None = one per region, 6), `region_grid` (h, w) of the pooled
      grid per representative slice (None = chosen so that s * h * w = T, the patch tokens of one
      slice, with h / w closest to the patch grid's aspect). r2 needs s = number of regions.
    - `mask_grid` (d, h, w): mask occupancy grid of the spatial token; `mask_threshold`: area fraction
      above which a resized mask voxel counts as inside.
    - `batch_size` slices per forward (a forward holds slices of one volume, so at most D are used);
      `prefetch` volumes read and preprocessed ahead of the encoder
      by `workers` reader processes (0: one reader thread in the job's process). On a GPU node,
      reading + preprocessing (~0.5-1.5 s of CPU per volume) sets the pace: raise workers with the
      job's threads;
      `compressor` of the cache (see `pipeline.feature_store`); `device` auto | cpu | cuda[:i].
    """

    input_size: tuple[int, int, int] = (32, 256, 256)
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    channel_windows: tuple[tuple[float, float], ...] | None = None
    layers: tuple[int, ...] = (3, 6, 9, 12)
    pooling: str = "r2"
    slices: int | None = None
    region_grid: tuple[int, int] | None = None
    mask_grid: tuple[int, int, int] = (8, 16, 16)
    mask_threshold: float = 0.25
    batch_size: int = 32
    prefetch: int = 2
    workers: int = 1
    compressor: str = "lz4"
    device: str = "auto"

    def __post_init__(self) -> None:
        if len(self.input_size) != 3 or min(self.input_size) < 1:
            raise FeatureConfigError(f"features.input_size {self.input_size}: three positive sizes (D, H, W)")
        lo, hi = self.hu_window
        if not hi > lo:
            raise FeatureConfigError(f"features.hu_window {list(self.hu_window)}: the upper bound must exceed the lower")
        windows = self.channel_windows
        if windows is not None and (not windows or any(len(w) != 2 or not w[1] > w[0] for w in windows)):
            raise FeatureConfigError(f"features.channel_windows {windows}: [lo, hi] HU windows with hi > lo, one per "
                                     f"encoder input channel (or null)")
        if not self.layers or min(self.layers) < 1:
            raise FeatureConfigError(f"features.layers {list(self.layers)}: blocks are numbered from 1")
        if self.pooling not in POOLING_MODES:
            raise FeatureConfigError(f"unknown pooling mode {self.pooling!r} (r2 or lita)")
        if not 0 < self.mask_threshold <= 1:
            raise FeatureConfigError("features.mask_threshold must be in (0, 1]")
        if self.batch_size < 1 or self.prefetch < 0 or self.workers < 0:
            raise FeatureConfigError("features.batch_size >= 1, features.prefetch >= 0, features.workers >= 0")
        s = self.n_slices
        if self.pooling == "r2" and s != len(REGIONS):
            raise FeatureConfigError(f"features.slices = {s}: R2 pooling picks one slice per region, so s must be "
                                     f"{len(REGIONS)} (the lita mode takes any s)")
        if s < 1:  # s > D is allowed: uniform picks then repeat slices, as LITA's frame sampling
            raise FeatureConfigError(f"features.slices = {s}: must be >= 1")

    @property
    def n_slices(self) -> int:
        """s, the number of representative slices."""
        return int(self.slices) if self.slices else len(REGIONS)

    def patch_grid(self, patch_size: int) -> tuple[int, int]:
        """The encoder's patch grid for one slice (the patch convolution floors)."""
        gh, gw = self.input_size[1] // patch_size, self.input_size[2] // patch_size
        if gh < 1 or gw < 1:
            raise FeatureConfigError(f"features.input_size {self.input_size}: slices smaller than one {patch_size}-px patch")
        return gh, gw

    def pooled_grid(self, patch_size: int) -> tuple[int, int]:
        """(h, w) per representative slice with s * h * w = T (validated or chosen)."""
        gh, gw = self.patch_grid(patch_size)
        t, s = gh * gw, self.n_slices
        if self.region_grid is not None:
            h, w = self.region_grid
            if h * w * s != t or h > gh or w > gw:
                raise FeatureConfigError(
                    f"features.region_grid {list(self.region_grid)} with s = {s} gives {h * w * s} region tokens; "
                    f"T = {t} ({gh} x {gw} patches of {patch_size} px): need s * h * w = T with h <= {gh}, w <= {gw}"
                    f" (or region_grid: null to choose it)")
            return int(h), int(w)
        if t % s:
            raise FeatureConfigError(f"T = {t} patch tokens per slice is not divisible by s = {s}: choose another s")
        per = t // s
        options = [(h, per // h) for h in range(1, per + 1) if per % h == 0 and h <= gh and per // h <= gw]
        if not options:
            raise FeatureConfigError(f"no h x w = {per} grid fits in the {gh} x {gw} patch grid")
        aspect = gh / gw
        return min(options, key=lambda hw: (round(abs(math.log(hw[0] / hw[1] / aspect)), 9), hw[0]))

    def to_params(self) -> dict[str, Any]:
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, tuple) else v

        return {k: plain(v) for k, v in asdict(self).items()}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> FeatureConfig:
        """From the JSON the rules pass (unknown keys are refused: a typo must not be ignored)."""
        known = {f.name for f in fields(cls)}
        unknown = set(params) - known
        if unknown:
            raise FeatureConfigError(f"unknown features setting(s): {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in params.items():
            if v is not None and k in ("input_size", "hu_window", "layers", "region_grid", "mask_grid"):
                v = tuple(float(x) for x in v) if k == "hu_window" else tuple(int(x) for x in v)
            if v is not None and k == "channel_windows":
                v = tuple((float(a), float(b)) for a, b in v)
            kw[k] = v
        return cls(**kw)
