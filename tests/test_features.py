"""The features stage: encoder loading, preprocessing, pooling (hand-computed toy), the streamed
encoder, the Zarr cache (writer, lazy reader, raw-token cache + re-pooling) and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from helpers import REPO, write_image

from pipeline import features
from pipeline.constants import CHANNELS, REGIONS, TOKEN_MASKS
from pipeline.feature_store import (
    FEATURE_ARRAYS,
    FeatureShardWriter,
    FeatureStore,
    FeatureStoreError,
    RawTokenStore,
    temporary_path,
    write_feature_shard,
)
from pipeline.features import FeatureConfig, FeatureConfigError
from pipeline.features.preprocess import PreparedVolume


def _bit(name: str) -> np.uint32:
    return np.uint32(1 << CHANNELS.index(name))


# --- pooling: the hand-computed 2-slice, 4 x 4-patch toy -------------------------------------------


def _toy_tokens() -> torch.Tensor:
    """(D=2, P=16, C=2): slice 0 holds 0..15 row-major, slice 1 holds 16..31; channel 1 = -channel 0."""
    t = torch.arange(32, dtype=torch.float32).view(2, 16)
    return torch.stack([t, -t], dim=-1)


def test_toy_r2_and_lita_match_hand_computed_tokens() -> None:
    tokens = _toy_tokens()
    # two regions: A is largest on slice 1, B on slice 0
    area = torch.tensor([[3.0, 5.0], [4.0, 1.0]])
    r2 = features.pool_tokens(tokens, (4, 4), area, "r2", None, (2, 4))  # s = 2, T / s = 8 tokens per slice
    # slice 0 pooled 4x4 -> 2x4 averages row pairs: (0+4)/2, (1+5)/2, ... = 2 3 4 5 / 10 11 12 13
    slice0 = [2, 3, 4, 5, 10, 11, 12, 13]
    slice1 = [v + 16 for v in slice0]
    assert r2["region_slices"].tolist() == [1, 0]
    assert r2["region"][:, 0].tolist() == slice1 + slice0 and r2["region"][:, 1].tolist() == [-v for v in slice1 + slice0]
    assert r2["global"][:, 0].tolist() == [7.5, 23.5]  # mean of 0..15 and of 16..31

    lita = features.pool_tokens(tokens, (4, 4), area, "lita", 2, (2, 4))  # uniform: round(linspace(0, 1, 2))
    assert lita["region_slices"].tolist() == [0, 1] and lita["region"][:, 0].tolist() == slice0 + slice1

    # s = 4 with a 2x2 grid keeps T = 16: slices round(linspace(0, 1, 4)) = 0 0 1 1
    lita4 = features.pool_tokens(tokens, (4, 4), area, "lita", 4, (2, 2))
    quad0 = [2.5, 4.5, 10.5, 12.5]  # (0+1+4+5)/4, (2+3+6+7)/4, (8+9+12+13)/4, (10+11+14+15)/4
    quad1 = [v + 16 for v in quad0]
    assert lita4["region_slices"].tolist() == [0, 0, 1, 1]
    assert lita4["region"][:, 0].tolist() == quad0 + quad0 + quad1 + quad1


def test_toy_mask_pooling_is_area_normalised_over_slices_and_patches() -> None:
    tokens = _toy_tokens()
    masks = torch.zeros(2, 2, 16)
    masks[0, 0, [0, 1]] = 1  # slice 0, patches 0 and 1 (tokens 0, 1)
    masks[0, 1, 15] = 1  # slice 1, patch 15 (token 31)
    pooled = features.mask_pool(tokens, masks)
    assert pooled[0].tolist() == pytest.approx([32 / 3, -32 / 3])
    assert pooled[1].tolist() == [0.0, 0.0]  # empty mask: zeros, no NaN


class _ToyEncoder(torch.nn.Module):
    """Dinov2-shaped stand-in: token of a patch = mean of its pixels; blocks = identity, layer norm none."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("C", (), {"patch_size": 14, "hidden_size": 1})()
        self.encoder = torch.nn.Module()
        self.encoder.layer = torch.nn.ModuleList([torch.nn.Identity(), torch.nn.Identity()])
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values: torch.Tensor):
        t = torch.nn.functional.avg_pool2d(pixel_values[:, :1], 14).flatten(1)[..., None]  # b, P, 1
        h = torch.cat([torch.zeros_like(t[:, :1]), t], dim=1)
        for block in self.encoder.layer:
            h = block(h)
        return type("O", (), {"last_hidden_state": h})()


def test_streamed_encoder_reproduces_the_toy_across_batches() -> None:
    """The real encode path (hooks, batches of one slice) on the toy: LITA s=4 with a 2x2 grid."""
    pixels = torch.arange(32, dtype=torch.float32).view(2, 4, 4).repeat_interleave(14, 1).repeat_interleave(14, 2)
    m = len(TOKEN_MASKS)
    patch_masks = torch.zeros(m, 2, 16)
    patch_masks[0, 0, [0, 1]] = 1
    patch_masks[0, 1, 15] = 1
    prep = PreparedVolume("toy", pixels, patch_masks, torch.zeros(len(REGIONS), 2), torch.zeros(m, 1, 1, 1),
                          (patch_masks.sum(dim=(1, 2)) > 0).numpy())
    cfg = FeatureConfig(input_size=(2, 56, 56), layers=(1, 2), pooling="lita", slices=4, region_grid=(2, 2),
                        mask_grid=(1, 1, 1), batch_size=1)
    out, raw = features.encode_prepared(_ToyEncoder(), np.zeros(3), np.ones(3), prep, cfg, keep_raw=True)
    quad0 = [2.5, 4.5, 10.5, 12.5]
    quad1 = [v + 16 for v in quad0]
    assert out["region"][:, 0].tolist() == quad0 + quad0 + quad1 + quad1
    assert out["global"][:, 0].tolist() == [7.5, 23.5]
    assert out["mask_pooled"][0, :, 0].tolist() == pytest.approx([32 / 3, 32 / 3])  # both levels
    assert not out["mask_pooled"][1:].any() and out["mask_present"].tolist() == [True] + [False] * (m - 1)
    assert raw["tokens"][:, :, 0].tolist() == torch.arange(32.0).view(2, 16).tolist()


def test_r2_picks_largest_area_slice_and_lita_uniform() -> None:
    area = torch.zeros(6, 8)
    area[0, 5] = 10
    area[0, 2] = 3
    area[1, 1] = 1
    slices, present = features.select_slices(area, "r2", depth=8)
    assert slices[:2] == [5, 1] and slices[2:] == [4, 4, 4, 4]  # empty regions -> middle slice
    assert present == [True, True, False, False, False, False]
    lita, _ = features.select_slices(area, "lita", depth=8)
    assert lita == [0, 1, 3, 4, 6, 7]  # LITA's round(linspace(0, D - 1, s))


def test_config_keeps_t_fixed_and_refuses_contradictions() -> None:
    assert FeatureConfig().pooled_grid(14) == (6, 9)  # s = 6 regions, T = 18 x 18 = 324
    assert FeatureConfig(pooling="lita", slices=4).pooled_grid(14) == (9, 9)
    assert FeatureConfig(pooling="lita", slices=3).pooled_grid(14) == (9, 12)
    with pytest.raises(FeatureConfigError, match="R2 pooling picks one slice per region"):
        FeatureConfig(pooling="r2", slices=4)
    with pytest.raises(FeatureConfigError, match=r"need s \* h \* w = T"):
        FeatureConfig(pooling="lita", slices=4, region_grid=(6, 9)).pooled_grid(14)
    with pytest.raises(FeatureConfigError, match="not divisible"):
        FeatureConfig(pooling="lita", slices=5).pooled_grid(14)
    with pytest.raises(FeatureConfigError, match="hu_window"):
        FeatureConfig(hu_window=(100.0, 100.0))
    with pytest.raises(FeatureConfigError, match="unknown features setting"):
        FeatureConfig.from_params({"polling": "r2"})
    params = FeatureConfig(pooling="lita", slices=4).to_params()
    assert FeatureConfig.from_params(json.loads(json.dumps(params))) == FeatureConfig(pooling="lita", slices=4)


# --- preprocessing ----------------------------------------------------------------------------------


def test_hu_window_min_max_and_constant_ct() -> None:
    cfg = FeatureConfig(input_size=(2, 4, 4))
    ct = np.array([-3000, -1000, 0, 1000, 3000, 500, -500, 0] * 4, np.float32).reshape(2, 4, 4)
    x = features.preprocess_ct(ct, cfg)
    assert x[0, :2].flatten().tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0, 0.75, 0.25, 0.5])
    for value in (-1024.0, 0.0, 4000.0):  # a constant CT: no division by its own (zero) range
        flat = features.preprocess_ct(np.full((5, 30, 30), value, np.float32), FeatureConfig(input_size=(8, 28, 28)))
        assert torch.isfinite(flat).all() and float(flat.max() - flat.min()) == 0.0


def test_channel_windows_give_one_ramp_per_channel() -> None:
    cfg = FeatureConfig(input_size=(2, 4, 4), channel_windows=((-1000.0, -900.0), (-10.0, 10.0), (400.0, 450.0)))
    ct = np.array([-1000, -950, -855, 0, 5, 40, 425, 1000] * 4, np.float32).reshape(2, 4, 4)
    x = features.preprocess_ct(ct, cfg)
    assert x.shape == (2, 3, 4, 4)
    assert x[0, 0, :2].flatten().tolist() == pytest.approx([0.0, 0.5, 1, 1, 1, 1, 1, 1])
    assert x[0, 1, :2].flatten().tolist() == pytest.approx([0, 0, 0, 0.5, 0.75, 1, 1, 1])
    assert x[0, 2, :2].flatten().tolist() == pytest.approx([0, 0, 0, 0, 0, 0, 0.5, 1])
    for bad in (((0.0, 0.0),), ((1.0, 2.0, 3.0),), ()):
        with pytest.raises(FeatureConfigError, match="channel_windows"):
            FeatureConfig(channel_windows=bad)
    params = cfg.to_params()  # JSON round trip (rule -> CLI)
    assert FeatureConfig.from_params(json.loads(json.dumps(params))) == cfg


def test_channel_means_encoder_carries_patch_means_through_every_block(tmp_path: Path) -> None:
    """Dims 0..C-1 of every block's output are the patch means of the C input channels, whatever the
    random weights elsewhere (attention and MLP read them but never write them)."""
    path = tmp_path / "enc"
    features.build_demo_encoder(path, hidden_size=16, layers=3, heads=2, channels=5, channel_means=True)
    enc, mean, std = features.load_encoder(path, layers=(1, 2, 3))
    assert enc.config.num_channels == 5 and mean.tolist() == [0.0] * 5 and std.tolist() == [1.0] * 5
    x = torch.rand(2, 5, 28, 42)
    out = enc(pixel_values=x, output_hidden_states=True)
    want = torch.nn.functional.avg_pool2d(x, 14).flatten(2).transpose(1, 2)  # (B, 6 patches, 5)
    for h in out.hidden_states[1:]:
        assert torch.allclose(h[:, 1:, :5], want, atol=1e-5)
    assert not torch.allclose(out.hidden_states[-1][:, 1:, 5:], out.hidden_states[1][:, 1:, 5:])  # the rest moves


def test_masks_resize_by_area_fraction_and_thin_structures_survive() -> None:
    # a 1-voxel-thick plane among 110 slices, resampled to 32: box fraction ~0.29 >= 0.25 survives;
    # trilinear point sampling could miss it
    mask = np.zeros((110, 40, 40), bool)
    mask[51] = True
    frac = features.mask_fraction(mask, (32, 40, 40))
    assert float(frac.sum()) == pytest.approx(32 / 110 * 40 * 40, rel=0.05)  # area is conserved
    assert features.binarise(frac, 0.25).any()
    # even below the threshold, a non-empty mask keeps its voxels of largest fraction
    tiny = np.zeros((110, 40, 40), bool)
    tiny[51, 20, 20] = True
    kept = features.binarise(features.mask_fraction(tiny, (32, 16, 16)), 0.25)
    assert kept.sum() >= 1
    assert not features.binarise(features.mask_fraction(np.zeros((4, 8, 8), bool), (8, 4, 4)), 0.25).any()


def test_patch_grid_folds_the_floored_margin_into_the_last_patch() -> None:
    b = torch.zeros(1, 32, 32, dtype=torch.bool)  # 32 px, patch 14 -> 2 x 2 patches covering 28 px
    b[0, 30, 31] = True  # only in the margin the patch convolution drops
    occ = features.patch_occupancy(b, 14)
    assert occ.shape == (1, 2, 2) and occ[0].tolist() == [[False, False], [False, True]]
    b[0, 30, 31] = False
    b[0, 3, 15] = True
    assert features.patch_occupancy(b, 14)[0].tolist() == [[False, True], [False, False]]


# --- encoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("enc") / "encoder"
    features.build_demo_encoder(path, hidden_size=16, layers=2, heads=2)
    return path


@pytest.fixture(scope="module")
def tiny_encoder(encoder_dir: Path):
    return features.load_encoder(encoder_dir, layers=(1, 2))


def test_demo_encoder_has_rad_dino_architecture() -> None:
    from transformers import Dinov2Model

    cfg = features.demo_encoder_config(768, 12, 12)
    for key, value in features.RAD_DINO_ARCH.items():
        assert getattr(cfg, key) == value, key
    assert getattr(cfg, "num_register_tokens", 0) == 0
    with torch.device("meta"):
        n = sum(p.numel() for p in Dinov2Model(cfg).parameters())
    assert 86.0e6 < n < 87.0e6  # ViT-B/14 at 518 px


def test_processor_normalisation_is_read_from_the_folder(encoder_dir: Path, tmp_path: Path) -> None:
    _, mean, std = features.load_encoder(encoder_dir)
    assert mean.tolist() == pytest.approx(features.RAD_DINO_MEAN) and std.tolist() == pytest.approx(features.RAD_DINO_STD)
    other = tmp_path / "enc"
    shutil.copytree(encoder_dir, other)
    proc = json.loads((other / "preprocessor_config.json").read_text(encoding="utf-8"))
    proc.update(image_mean=[0.5, 0.4, 0.3], image_std=[0.25, 0.2, 0.1])
    (other / "preprocessor_config.json").write_text(json.dumps(proc), encoding="utf-8")
    mean, std = features.processor_normalisation(other)
    assert mean.tolist() == pytest.approx([0.5, 0.4, 0.3]) and std.tolist() == pytest.approx([0.25, 0.2, 0.1])
    (other / "preprocessor_config.json").unlink()
    with pytest.raises(features.EncoderError, match="no preprocessor_config.json"):
        features.load_encoder(other)


def test_missing_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(features.EncoderError, match="hf download microsoft/rad-dino"):
        features.load_encoder(tmp_path / "nowhere" / "rad-dino")
    with pytest.raises(features.EncoderError, match="local Hugging Face cache"):
        features.load_encoder("nobody-here/not-a-model")  # offline: only the local cache is looked at


def test_encoder_with_other_architecture_is_refused(encoder_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(features.EncoderError, match=r"hidden_size is 16 \(expected 768\)"):
        features.load_encoder(encoder_dir, expect={"hidden_size": 768, "patch_size": 14})
    with pytest.raises(features.EncoderError, match=r"block\(s\) \[12\] outside 1..2"):
        features.load_encoder(encoder_dir, layers=(1, 12))
    # config.json that does not describe the weights: no silent shape mismatch or random layers
    for field, value, message in (("hidden_size", 32, "do not fit"), ("num_hidden_layers", 3, "missing_keys"),
                                  ("model_type", "vit", "expected 'dinov2'")):
        bad = tmp_path / f"bad-{field}"
        shutil.copytree(encoder_dir, bad)
        cfg = json.loads((bad / "config.json").read_text(encoding="utf-8"))
        cfg[field] = value
        (bad / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        with pytest.raises(features.EncoderError, match=message):
            features.load_encoder(bad)


# --- the encoder step -------------------------------------------------------------------------------


def _labels(shape: tuple[int, int, int]) -> np.ndarray:
    labels = np.zeros(shape, np.uint32)
    z = shape[0]
    labels[z // 4 : z // 2] |= _bit("lung")
    labels[2 * z // 3, 10:20, 10:20] |= _bit("heart")
    return labels


def test_encode_volume_shapes_and_mask_pooling(tiny_encoder) -> None:
    encoder, mean, std = tiny_encoder
    ct = np.random.default_rng(0).normal(-500, 300, (12, 40, 40)).astype(np.float32)
    cfg = FeatureConfig(input_size=(8, 256, 256), layers=(1, 2), batch_size=3)
    out = features.encode_volume(encoder, mean, std, ct, _labels(ct.shape), cfg)
    c = encoder.config.hidden_size
    assert out["global"].shape == (8, c)
    assert out["global"].shape[0] + out["region"].shape[0] == 8 + 324  # D + T vision tokens
    assert out["mask_pooled"].shape == (len(TOKEN_MASKS), 2, c)
    assert out["mask_grid"].shape == (len(TOKEN_MASKS), 8, 16, 16)
    present = dict(zip(TOKEN_MASKS, out["mask_present"]))
    assert present["lung"] and present["heart"] and not present["nodule"]
    assert not out["mask_pooled"][TOKEN_MASKS.index("nodule")].any()
    lung_slice, heart_slice = out["region_slices"][0], out["region_slices"][REGIONS.index("heart")]
    assert 2 <= lung_slice <= 3 and heart_slice == 5  # z 3:6 of 12 -> 2..3 of 8; z 8 -> 5 of 8


def test_streamed_encoding_equals_pooling_of_all_hidden_states(tiny_encoder) -> None:
    """Hooks + per-batch sums give exactly what pooling the full output_hidden_states would."""
    encoder, mean, std = tiny_encoder
    ct = np.random.default_rng(1).normal(-400, 400, (10, 50, 50)).astype(np.float32)
    for pooling in ("r2", "lita"):
        cfg = FeatureConfig(input_size=(7, 84, 84), layers=(1, 2), batch_size=3, pooling=pooling)  # 6 x 6 patches
        prep = features.prepare_volume(ct, _labels(ct.shape), cfg, 14)
        out, raw = features.encode_prepared(encoder, mean, std, prep, cfg, keep_raw=True)
        x = (prep.pixels[:, None].expand(-1, 3, -1, -1) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
            1, 3, 1, 1)
        with torch.inference_mode():
            full = encoder(pixel_values=x, output_hidden_states=True)
        ref = features.pool_tokens(full.last_hidden_state[:, 1:], (6, 6), prep.region_area, pooling, None,
                                   cfg.pooled_grid(14))
        for key in ("global", "region", "region_slices"):
            np.testing.assert_allclose(out[key], ref[key], atol=1e-5, err_msg=key)
        for li, layer in enumerate(cfg.layers):
            expect = features.mask_pool(full.hidden_states[layer][:, 1:], prep.patch_masks).numpy()
            np.testing.assert_allclose(out["mask_pooled"][:, li], expect, atol=1e-5)
        np.testing.assert_allclose(raw["tokens"], full.last_hidden_state[:, 1:].numpy(), atol=1e-2)


def test_fewer_slices_than_d_empty_masks_and_constant_ct(tiny_encoder) -> None:
    encoder, mean, std = tiny_encoder
    cfg = FeatureConfig(input_size=(8, 84, 84), layers=(1, 2))
    short = np.random.default_rng(2).normal(-500, 300, (3, 30, 30)).astype(np.float32)  # 3 slices < D = 8
    labels = np.zeros(short.shape, np.uint32)
    labels[1, 5:8, 5:8] |= _bit("nodule")  # one slice, 9 voxels: must survive the resize
    out = features.encode_volume(encoder, mean, std, short, labels, cfg)
    assert out["global"].shape[0] == 8 and out["mask_present"][TOKEN_MASKS.index("nodule")]
    assert np.isfinite(out["mask_pooled"]).all()

    empty = features.encode_volume(encoder, mean, std, short, np.zeros(short.shape, np.uint32), cfg)
    assert not empty["mask_present"].any() and not empty["mask_pooled"].any() and not empty["mask_grid"].any()
    assert empty["region_slices"].tolist() == [4] * 6  # documented fallback: the middle slice

    flat = features.encode_volume(encoder, mean, std, np.full((6, 30, 30), -1000.0, np.float32), _labels((6, 30, 30)), cfg)
    for key, value in flat.items():
        assert np.isfinite(value.astype(np.float32)).all(), key


# --- the Zarr cache ---------------------------------------------------------------------------------


def _arrays(n: int, c: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "global": rng.normal(size=(n, 32, c)),
        "region": rng.normal(size=(n, 324, c)),
        "mask_pooled": rng.normal(size=(n, 9, 4, c)),
        "mask_grid": rng.random((n, 9, 8, 16, 16)),
        "region_slices": rng.integers(0, 32, (n, 6)),
        "mask_present": rng.random((n, 9)) > 0.5,
    }


@pytest.mark.parametrize("compressor", ["lz4", "zstd", "none"])
def test_store_round_trip_every_compressor(tmp_path: Path, compressor: str) -> None:
    arrays = _arrays(4)
    ids = [f"v{i}" for i in range(4)]
    write_feature_shard(tmp_path / "shard-0.zarr", ids, arrays, {"hidden_size": 8, "pooling": "r2"}, compressor)
    store = FeatureStore([tmp_path / "shard-0.zarr"])
    assert store.volume_ids == ids and len(store) == 4 and "v2" in store and "v9" not in store
    assert store.attrs["pooling"] == "r2" and store.attrs["compressor"] == compressor
    sample = store["v2"]
    assert set(sample) == set(FEATURE_ARRAYS)
    assert sample["global"].dtype == np.float16 and sample["global"].flags.writeable
    assert sample["region_slices"].dtype == np.int16 and sample["mask_present"].dtype == bool
    for name in FEATURE_ARRAYS:
        np.testing.assert_array_equal(sample[name], np.asarray(arrays[name][2]).astype(sample[name].dtype))
    # still an ordinary Zarr v3 group: the packed array read through zarr's API agrees
    packed = zarr.open_group(str(tmp_path / "shard-0.zarr"), mode="r")["packed"]
    assert packed.shape[0] == 4 and packed.chunks[0] == 1
    np.testing.assert_array_equal(packed[2][:256], sample["global"].ravel()[:256])


def test_reader_opens_many_shards_lazily_and_refuses_mixed_caches(tmp_path: Path) -> None:
    for k in range(3):
        write_feature_shard(tmp_path / f"shard-{k}.zarr", [f"s{k}v{i}" for i in range(2)], _arrays(2, seed=k),
                            {"pooling": "r2"})
    store = FeatureStore(sorted(tmp_path.glob("shard-*.zarr")))
    assert len(store) == 6 and not any(s._ready for s in store._shards)  # nothing but group metadata read
    assert store["s2v1"]["global"].shape == (32, 8) and sum(s._ready for s in store._shards) == 1
    write_feature_shard(tmp_path / "lita" / "shard-9.zarr", ["x"], _arrays(1), {"pooling": "lita"})
    with pytest.raises(FeatureStoreError, match="pooling"):
        FeatureStore([tmp_path / "shard-0.zarr", tmp_path / "lita" / "shard-9.zarr"])
    with pytest.raises(FeatureStoreError, match="not in the feature cache"):
        store["nope"]


def test_writer_refuses_bad_values_and_cleans_up(tmp_path: Path) -> None:
    arrays = _arrays(2)
    arrays["global"][1, 3, 0] = np.nan
    with pytest.raises(FeatureStoreError, match="volume b: global has non-finite values"):
        write_feature_shard(tmp_path / "shard-0.zarr", ["a", "b"], arrays, {})
    assert not (tmp_path / "shard-0.zarr").exists() and not temporary_path(tmp_path / "shard-0.zarr").exists()
    arrays = _arrays(2)
    arrays["global"][1, 3, 0] = 1e6  # beyond fp16
    with pytest.raises(FeatureStoreError, match="fp16 range"):
        write_feature_shard(tmp_path / "shard-0.zarr", ["a", "b"], arrays, {})


def test_damaged_shards_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "shard-0.zarr"
    write_feature_shard(path, ["a", "b"], _arrays(2), {})
    shutil.rmtree(path / "packed" / "c" / "1")
    store = FeatureStore([path])
    assert store["a"]["global"].shape == (32, 8)
    with pytest.raises(FeatureStoreError, match="chunk of volume b is missing"):
        store["b"]
    # a shard that never got its `complete` flag (e.g. copied from a temporary path)
    writer = FeatureShardWriter(tmp_path / "shard-1.zarr", {}, capacity=2)
    writer.add("a", {k: v[0] for k, v in _arrays(1).items()})
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore([writer.tmp])
    writer.abort()
    assert not writer.tmp.exists() and not (tmp_path / "shard-1.zarr").exists()


def test_first_layout_shards_stay_readable(tmp_path: Path) -> None:
    """Shards of the first cache layout (six zarr arrays) are read through zarr's API."""
    arrays = _arrays(2)
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    for name in FEATURE_ARRAYS:
        data = np.asarray(arrays[name])
        data = data.astype(bool if name == "mask_present" else np.int16 if name == "region_slices" else np.float16)
        group.create_array(name, shape=data.shape, chunks=(1, *data.shape[1:]), dtype=data.dtype)[...] = data
    group.attrs.update({"volume_ids": ["a", "b"], "complete": True})
    sample = FeatureStore([tmp_path / "old.zarr"])["b"]
    np.testing.assert_array_equal(sample["region"], arrays["region"][1].astype(np.float16))


# --- the stage on a small shard ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("shard")
    rng = np.random.default_rng(0)
    rows = []
    group = zarr.open_group(str(root / "masks.zarr"), mode="w", zarr_format=3)
    for i, shape in enumerate([(12, 40, 40), (5, 36, 44), (20, 30, 30)]):  # the second has fewer slices than D
        vid = f"v{i}"
        ct = write_image(root / f"{vid}.nii.gz", rng.normal(-400, 300, shape).astype(np.int16))
        labels = _labels(shape)
        group.create_array(vid, shape=shape, chunks=shape, dtype=np.uint32)[...] = labels
        rows.append({"volume_id": vid, "shard": 0, "ct_path": str(ct)})
    group.attrs.update({"volume_ids": [r["volume_id"] for r in rows], "channels": list(CHANNELS), "complete": True})
    return {"root": root, "manifest": pd.DataFrame(rows), "masks": root / "masks.zarr"}


def _stage_cfg(**kw) -> FeatureConfig:
    return FeatureConfig(**{"input_size": (8, 84, 84), "layers": (1, 2), "batch_size": 4, **kw})  # 6 x 6 patches


def test_run_shard_streams_volumes_and_records_provenance(shard, encoder_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "r2" / "shard-0.zarr"
    ids = features.run_shard(shard["manifest"], 0, shard["masks"], str(encoder_dir), None, _stage_cfg(), out)
    assert ids == ["v0", "v1", "v2"]
    store = FeatureStore([out])
    a = store.attrs
    assert a["encoder"] == str(encoder_dir) and len(a["weights_sha256"]) == 64 and a["layers"] == [1, 2]
    assert a["input_size"] == [8, 84, 84] and a["pooling"] == "r2" and a["slices"] == 6
    assert a["region_grid"] == [2, 3] and a["region_tokens"] == 36 and a["code_version"] == features.CODE_VERSION
    assert store["v1"]["global"].shape == (8, 16) and store["v1"]["region"].shape == (36, 16)
    assert not temporary_path(out).exists()


def test_run_shard_with_channel_windows(shard, tmp_path: Path) -> None:
    """Windows reach the encoder one per channel (the channel-means dims of the mask-pooled features
    are then each window's mean over the mask), are recorded in the cache, and a window count that
    differs from the encoder's input channels is refused before anything is written."""
    enc = tmp_path / "enc"
    features.build_demo_encoder(enc, hidden_size=16, layers=2, heads=2, channels=3, channel_means=True)
    windows = ((-1000.0, -500.0), (-150.0, 250.0), (400.0, 1200.0))
    out = tmp_path / "w" / "shard-0.zarr"
    features.run_shard(shard["manifest"], 0, shard["masks"], str(enc), None, _stage_cfg(channel_windows=windows), out)
    store = FeatureStore([out])
    assert store.attrs["channel_windows"] == [list(w) for w in windows]
    pooled = store["v0"]["mask_pooled"][:, 0, :3].astype(np.float32)  # block 1, dims 0..2: window means
    present = store["v0"]["mask_present"]
    assert (pooled[present] >= 0).all() and (pooled[present] <= 1.001).all()
    assert len({tuple(np.round(r, 2)) for r in pooled[present].T}) == 3  # three windows, three different means
    bad = tmp_path / "bad" / "shard-0.zarr"
    with pytest.raises(FeatureConfigError, match="2 windows.*3 input channels"):
        features.run_shard(shard["manifest"], 0, shard["masks"], str(enc), None,
                           _stage_cfg(channel_windows=windows[:2]), bad)
    assert not bad.exists() and not temporary_path(bad).exists()


def test_raw_token_cache_repools_without_reencoding(shard, encoder_dir: Path, tmp_path: Path) -> None:
    raw = tmp_path / "raw" / "shard-0.zarr"
    direct = {}
    for pooling in ("r2", "lita"):
        direct[pooling] = tmp_path / pooling / "shard-0.zarr"
        features.run_shard(shard["manifest"], 0, shard["masks"], str(encoder_dir), None, _stage_cfg(pooling=pooling),
                           direct[pooling], raw_out=raw if pooling == "r2" else None)
    tokens = RawTokenStore(raw)["v0"]["tokens"]
    assert tokens.dtype == np.float16 and tokens.shape == (8, 36, 16)
    for pooling in ("r2", "lita"):
        out = tmp_path / f"repooled-{pooling}" / "shard-0.zarr"
        features.pool_shard(raw, _stage_cfg(pooling=pooling), out)
        a, b = FeatureStore([direct[pooling]]), FeatureStore([out])
        assert b.attrs["pooling"] == pooling and b.attrs["weights_sha256"] == a.attrs["weights_sha256"]
        for vid in a.volume_ids:
            for name in FEATURE_ARRAYS:  # equal up to the fp16 rounding of the cached tokens
                np.testing.assert_allclose(b[vid][name].astype(np.float32), a[vid][name].astype(np.float32),
                                           atol=2e-2, err_msg=f"{pooling} {vid} {name}")
    # LITA with another s re-pools from the same cache; T is kept
    out = tmp_path / "lita4" / "shard-0.zarr"
    features.pool_shard(raw, _stage_cfg(pooling="lita", slices=4), out)
    sample = FeatureStore([out])["v2"]
    assert sample["region"].shape == (36, 16) and sample["region_slices"].tolist() == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="need re-encoding"):
        features.pool_shard(raw, _stage_cfg(layers=(2,)), tmp_path / "x.zarr")


def test_prefetch_reads_the_next_volume_while_the_current_one_is_encoded() -> None:
    started = [threading.Event() for _ in range(4)]

    def load(i: int) -> int:
        started[i].set()
        if i == 2:
            raise ValueError("bad volume 2")
        return i * 10

    seen = []
    for i, fut in features.prefetched(range(4), load, depth=2):
        if i == 0:  # while item 0 is "encoded", items 1 and 2 are being read
            assert started[1].wait(5) and started[2].wait(5)
        try:
            seen.append(fut.result())
        except ValueError:
            seen.append("error")
    assert seen == [0, 10, "error", 30]
    assert [f.result() for _, f in features.prefetched(range(3), lambda i: i, depth=0)] == [0, 1, 2]


def test_interrupted_shard_is_incomplete_and_rebuilt_on_rerun(shard, encoder_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shard-0.zarr"
    manifest = tmp_path / "cohort.parquet"
    shard["manifest"].to_parquet(manifest)
    args = ["encode", "--manifest", str(manifest), "--shard", "0", "--masks", str(shard["masks"]),
            "--encoder", str(encoder_dir), "--params-json", json.dumps(_stage_cfg().to_params()), "--out", str(out)]
    # the job dies hard (no cleanup, as under SIGKILL / a node failure) after the first volume is written
    script = (
        "import os, sys\n"
        "from pipeline.features import stage\n"
        "real, n = stage.encode_prepared, [0]\n"
        "def dying(*a, **k):\n"
        "    n[0] += 1\n"
        "    if n[0] == 2:\n"
        "        os._exit(9)\n"
        "    return real(*a, **k)\n"
        "stage.encode_prepared = dying\n"
        "stage.main(sys.argv[1:])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True,
                          encoding="utf-8", errors="replace",
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == 9, proc.stderr[-2000:]
    tmp = temporary_path(out)
    assert not out.exists() and tmp.is_dir()  # nothing that looks finished
    with pytest.raises(FeatureStoreError, match="incomplete"):
        FeatureStore([tmp])
    subprocess.run([sys.executable, "-m", "pipeline.features", *args], cwd=REPO, check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert not tmp.exists() and FeatureStore([out]).volume_ids == ["v0", "v1", "v2"]


@pytest.mark.parametrize("workers", [0, 2])  # a reader thread / two reader processes
def test_skip_mode_drops_a_bad_volume_and_fail_mode_leaves_nothing(shard, encoder_dir: Path, tmp_path: Path,
                                                                   workers: int) -> None:
    manifest = shard["manifest"].copy()
    bad = tmp_path / "v1.nii.gz"
    data = Path(manifest.loc[1, "ct_path"]).read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    manifest.loc[1, "ct_path"] = str(bad)
    out = tmp_path / "shard-0.zarr"
    from pipeline.io import InputError

    cfg = _stage_cfg(workers=workers)
    with pytest.raises(InputError, match=r"volume v1: .*v1\.nii\.gz"):
        features.run_shard(manifest, 0, shard["masks"], str(encoder_dir), None, cfg, out)
    assert not out.exists() and not temporary_path(out).exists()
    ids = features.run_shard(manifest, 0, shard["masks"], str(encoder_dir), None, cfg, out, on_error="skip")
    assert ids == ["v0", "v2"] and FeatureStore([out]).volume_ids == ["v0", "v2"]


def test_gpu_benchmark_script_runs_in_tiny_mode(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_features.py"), "--tiny", "--device", "cpu",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, encoding="utf-8", errors="replace",
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_features.json").read_text(encoding="utf-8"))
    assert result["sweep"] and result["encode_volume"]["slices_per_s"] > 0


def test_hub_id_and_revision_resolve_offline_from_the_local_cache(encoder_dir: Path, tmp_path: Path) -> None:
    """A hub id is read from the local Hugging Face cache (no network), at the revision asked for."""
    repo = tmp_path / "hub" / "models--acme--tiny-dino"
    for commit in ("a" * 40, "b" * 40):
        shutil.copytree(encoder_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40, encoding="utf-8")
    cache = tmp_path / "hub"
    model, mean, _ = features.load_encoder("acme/tiny-dino", revision="a" * 40, cache_dir=cache)
    assert model.config.hidden_size == 16 and mean.tolist() == pytest.approx(features.RAD_DINO_MEAN)
    assert features.encoder_provenance("acme/tiny-dino", None, cache_dir=cache)["snapshot"] == "b" * 40
    with pytest.raises(features.EncoderError, match="revision c+"):
        features.load_encoder("acme/tiny-dino", revision="c" * 40, cache_dir=cache)
