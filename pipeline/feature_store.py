"""The feature cache: one Zarr v3 group per shard, one packed fp16 chunk per volume.

Layout of `shard-<k>.zarr` (N = volumes in the shard):

    packed         float16 (N, F), chunks (1, F): the six arrays of one volume, flattened and
                   concatenated in `FEATURE_ARRAYS` order (F = 319,503 values at the defaults)

and the group attributes `layout` (name, dtype, shape of each of the six arrays), `volume_ids` (row
order), `complete` (written last, before the rename), `store_format` and the provenance of the
numbers (encoder id / revision / weights hash, input size, layers, pooling mode, s, code version).

The six arrays a sample is made of (D slices, T region tokens, C encoder width, M token masks,
L levels, s representative slices):

    global         float16 (D, C)        per-slice mean of final-layer patch tokens
    region         float16 (T, C)        R2 / LITA region tokens
    mask_pooled    float16 (M, L, C)     area-normalised mask pooling per level
    mask_grid      float16 (M, d, h, w)  mask occupancy on a small grid (spatial token input)
    region_slices  int16   (s,)          slice picked per region token group (exact in fp16, < 2048)
    mask_present   bool    (M,)          False where the mask is empty (stored as 0 / 1)

Why one packed array rather than six: reading a sample is then one file read and one decode. Six
compressed arrays per volume read at ~130 samples/s through zarr's API; the packed chunk, read with
one `open/readinto` and decoded by the codec named in the array's own `zarr.json`, reads at several
thousand samples/s on one core (both measured by benchmarks/features_reader.py). The store stays an ordinary
Zarr v3 group: `zarr.open_group(path)["packed"][i]` is volume i, and any layout the fast path does not
know (another codec, sharding) is read through zarr's API instead.

Why light compression (blosc lz4, no shuffle: `compressor` "lz4") rather than zstd: encoder features in
fp16 are high-entropy, so no codec saves much on them; lz4 squeezes the sparse `mask_grid` and the
blocks it cannot compress are stored as they are, so it decodes at memcpy speed. zstd saves another
~5-10 % at 10-30x the decode time, which would cost the reader its goal; byte shuffle gains nothing
here and halves decode speed. At the defaults a volume takes ~0.6 MB (goal <= 1.2 MB) against
15.9 MB for the raw final-layer tokens (benchmarks/features_size.py). "zstd" and "none" are available.

Every shard is written to a hidden temporary sibling (`.shard-<k>.zarr.tmp`) and renamed into place
when complete, so an interrupted job leaves no output that looks finished; a rerun removes the leftover.
The optional raw-token cache (`RawTokenWriter` / `RawTokenStore`) keeps final-layer patch tokens per
volume so that the pooling can change without re-encoding.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.io import atomic_output

FEATURE_ARRAYS: tuple[str, ...] = (
    "global",
    "region",
    "mask_pooled",
    "mask_grid",
    "region_slices",
    "mask_present",
)
_DTYPES = {
    "global": np.float16,
    "region": np.float16,
    "mask_pooled": np.float16,
    "mask_grid": np.float16,
    "region_slices": np.int16,
    "mask_present": np.bool_,
}
STORE_FORMAT = "medregion-ct/features-packed-1"
RAW_FORMAT = "medregion-ct/raw-tokens-1"
PACKED = "packed"
COMPRESSORS: tuple[str, ...] = ("lz4", "zstd", "none")
# Attributes that must agree between the shards one reader serves (mixing r2 and lita, or two
# encoders, in one training set would be silently wrong).
_CONSISTENT = ("encoder", "revision", "weights_sha256", "hidden_size", "input_size", "hu_window", "channel_windows", "layers",
               "pooling", "slices", "region_grid", "mask_grid", "code_version")
_FP16_EXACT_INT = 2048


class FeatureStoreError(RuntimeError):
    """A feature shard is missing, incomplete or inconsistent."""


def temporary_path(path: Path) -> Path:
    """The hidden sibling a shard is written into before the rename (fixed name: a rerun removes it)."""
    return path.with_name(f".{path.name}.tmp")


def _codec(name: str) -> Any:
    from zarr.codecs import BloscCodec, ZstdCodec

    if name == "none":
        return None
    if name == "lz4":
        return BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=2)
    if name == "zstd":
        return ZstdCodec(level=3)
    raise FeatureStoreError(f"unknown compressor {name!r} (one of {', '.join(COMPRESSORS)})")


class _AtomicShard:
    """A Zarr v3 group written at a temporary path, renamed to `path` by `commit()`.

    The temporary and the rename are `pipeline.io.atomic_output`'s, held open from construction to
    `commit()` / `abort()`; the temporary keeps its fixed name (`temporary_path`).
    """

    def __init__(self, path: Path | str, attrs: Mapping[str, Any]):
        self.path = Path(path)
        self.attrs = dict(attrs)
        self.volume_ids: list[str] = []
        self._output = atomic_output(self.path, temporary=temporary_path(self.path))
        self.tmp = self._output.__enter__()  # the leftover of an interrupted run is removed here
        self.group = zarr.open_group(str(self.tmp), mode="w", zarr_format=3)
        self.group.attrs.update({**self.attrs, "complete": False})
        self._done = False

    def _check_id(self, volume_id: str) -> None:
        if volume_id in self.volume_ids:
            raise FeatureStoreError(f"{self.path}: volume {volume_id} written twice")

    def _finish(self, extra: Mapping[str, Any]) -> None:
        # `complete` is the last thing written, and the rename comes after it.
        self.group.attrs.update({**extra, "volume_ids": list(self.volume_ids), "complete": True})
        self._done = True
        self._output.__exit__(None, None, None)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            stop = FeatureStoreError(f"{self.path}: writing aborted")
            self._output.__exit__(FeatureStoreError, stop, None)  # removes the temporary

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def commit(self) -> list[str]:  # pragma: no cover - overridden
        raise NotImplementedError


def _layout(arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    return [{"name": n, "dtype": np.dtype(_DTYPES[n]).name, "shape": [int(s) for s in np.shape(arrays[n])]}
            for n in FEATURE_ARRAYS]


def _pack(volume_id: str, arrays: Mapping[str, np.ndarray], layout: list[dict[str, Any]], where: Path) -> np.ndarray:
    missing = set(FEATURE_ARRAYS) - set(arrays)
    if missing:
        raise FeatureStoreError(f"{where}: arrays missing: {sorted(missing)}")
    parts = []
    for spec in layout:
        name = spec["name"]
        a = np.asarray(arrays[name])
        if list(a.shape) != spec["shape"]:
            raise FeatureStoreError(f"{where}: volume {volume_id}: {name} has shape {list(a.shape)}, "
                                    f"the shard's other volumes {spec['shape']}")
        if name == "region_slices" and a.size and (np.abs(a).max() >= _FP16_EXACT_INT):
            raise FeatureStoreError(f"{where}: volume {volume_id}: slice index >= {_FP16_EXACT_INT}")
        with np.errstate(over="ignore", invalid="ignore"):
            h = a.astype(np.float16).ravel()
        if not np.isfinite(h).all():
            raise FeatureStoreError(f"{where}: volume {volume_id}: {name} has non-finite values "
                                    f"(NaN, or beyond the fp16 range): refusing to cache them")
        parts.append(h)
    return np.concatenate(parts) if parts else np.zeros(0, np.float16)


class FeatureShardWriter(_AtomicShard):
    """Streams the volumes of one shard into the packed layout; `commit()` makes it visible.

    `capacity` is an upper bound on the number of volumes (the rows of the shard); the array is cut
    to the volumes actually added. Used as a context manager, an exception removes the temporary
    store and re-raises.
    """

    def __init__(self, path: Path | str, attrs: Mapping[str, Any], capacity: int, compressor: str = "lz4"):
        self.capacity = max(1, int(capacity))
        self.codec = _codec(compressor)
        self.compressor = compressor
        self.layout: list[dict[str, Any]] | None = None
        self.array: zarr.Array | None = None
        super().__init__(path, {**attrs, "store_format": STORE_FORMAT, "compressor": compressor})

    def add(self, volume_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._check_id(volume_id)
        if self.layout is None:
            self.layout = _layout(arrays)
        vec = _pack(volume_id, arrays, self.layout, self.path)
        if self.array is None:
            self.array = self.group.create_array(
                PACKED, shape=(self.capacity, max(1, vec.size)), chunks=(1, max(1, vec.size)), dtype=np.float16,
                compressors=[self.codec] if self.codec is not None else None, fill_value=0,
                config={"write_empty_chunks": True},
            )
        if len(self.volume_ids) >= self.array.shape[0]:
            self.array.resize((self.array.shape[0] * 2, self.array.shape[1]))
        self.array[len(self.volume_ids)] = vec
        self.volume_ids.append(str(volume_id))

    def commit(self) -> list[str]:
        n = len(self.volume_ids)
        if self.array is None:  # no volume: an empty, valid shard
            self.array = self.group.create_array(PACKED, shape=(0, 1), chunks=(1, 1), dtype=np.float16)
        else:
            self.array.resize((n, self.array.shape[1]))
        self._finish({"layout": self.layout or []})
        return list(self.volume_ids)


def write_feature_shard(
    path: Path,
    volume_ids: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any],
    compressor: str = "lz4",
) -> None:
    """Write one shard from stacked arrays (first axis = volume), atomically."""
    path = Path(path)
    missing = set(FEATURE_ARRAYS) - set(arrays)
    if missing:
        raise FeatureStoreError(f"{path}: arrays missing: {sorted(missing)}")
    n = len(volume_ids)
    for name in FEATURE_ARRAYS:
        if n and np.shape(arrays[name])[0] != n:
            raise FeatureStoreError(f"{path}: array {name} has {np.shape(arrays[name])[0]} rows for {n} volumes")
    with FeatureShardWriter(path, attrs, capacity=n, compressor=compressor) as writer:
        for i, vid in enumerate(volume_ids):
            writer.add(vid, {name: np.asarray(arrays[name][i]) for name in FEATURE_ARRAYS})


# --- reading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FeatureStoreError(f"{path.parent}: not a Zarr v3 store (no zarr.json)") from None
    except (OSError, ValueError) as exc:
        raise FeatureStoreError(f"{path}: unreadable ({exc})") from exc


def _fast_decoder(meta: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(decode function, chunk key prefix) when the array is a layout this reader decodes itself."""
    if meta.get("zarr_format") != 3 or meta.get("data_type") != "float16":
        return None
    key = meta.get("chunk_key_encoding", {})
    if key.get("name") != "default" or key.get("configuration", {}).get("separator", "/") != "/":
        return None
    codecs = meta.get("codecs", [])
    if not codecs or codecs[0].get("name") != "bytes":
        return None
    if codecs[0].get("configuration", {}).get("endian", "little") != "little":
        return None
    rest = codecs[1:]
    if not rest:
        return (None, "c")
    if len(rest) == 1 and rest[0].get("name") == "blosc":
        from numcodecs import blosc

        return (lambda b, out: blosc.decompress(b, out), "c")
    if len(rest) == 1 and rest[0].get("name") == "zstd" and not rest[0].get("configuration", {}).get("checksum"):
        from numcodecs import Zstd

        zstd = Zstd()
        return (lambda b, out: zstd.decode(b, out), "c")
    return None


class _Shard:
    """One shard: its ids at open time, its array metadata and decoder on first read."""

    def __init__(self, path: Path):
        self.path = path
        meta = _read_json(path / "zarr.json")
        if meta.get("node_type") != "group":
            raise FeatureStoreError(f"{path}: not a Zarr group")
        attrs = meta.get("attributes", {})
        if not attrs.get("complete", False):
            raise FeatureStoreError(f"{path}: feature shard is incomplete (interrupted write): rerun the "
                                    f"features rule to rebuild it")
        self.attrs: dict[str, Any] = attrs
        self.volume_ids: list[str] = [str(v) for v in attrs.get("volume_ids", [])]
        self.packed = "layout" in attrs
        self._ready = False

    def check_features(self) -> None:
        """A feature shard: the packed layout or the first layout's six arrays (not a masks store, say)."""
        fmt = self.attrs.get("store_format")
        ok = fmt != RAW_FORMAT and (self.packed or (self.path / FEATURE_ARRAYS[0] / "zarr.json").is_file())
        if not ok:
            raise FeatureStoreError(f"{self.path}: not a feature shard (store_format {fmt!r}, expected {STORE_FORMAT!r})")

    def _prepare(self) -> None:
        self.specs: list[tuple[str, np.dtype, tuple[int, ...], int, int]] = []
        self._fast = None
        self._zarr: Any = None
        if not self.packed:  # the first layout: six zarr arrays
            self._zarr = zarr.open_group(str(self.path), mode="r")
            self._ready = True
            return
        start = 0
        for spec in self.attrs["layout"]:
            size = math.prod(spec["shape"])
            self.specs.append((spec["name"], np.dtype(spec["dtype"]), tuple(spec["shape"]), start, start + size))
            start += size
        self.n_values = start
        meta = _read_json(self.path / PACKED / "zarr.json")
        shape = meta.get("shape", [])
        if len(shape) != 2 or shape[0] != len(self.volume_ids) or (self.volume_ids and shape[1] != self.n_values):
            raise FeatureStoreError(f"{self.path}: packed array has shape {shape}, expected "
                                    f"[{len(self.volume_ids)}, {self.n_values}]: the shard is damaged, rebuild it")
        fast = _fast_decoder(meta)
        if fast is not None:
            self._fast = fast[0]
            self._chunk_root = str(self.path / PACKED / fast[1])
            self._fast_on = True
        else:
            self._fast_on = False
            self._zarr = zarr.open_array(str(self.path / PACKED), mode="r")
        self._ready = True

    def read(self, row: int, volume_id: str) -> dict[str, np.ndarray]:
        if not self._ready:
            self._prepare()
        if not self.packed:
            return {name: np.asarray(self._zarr[name][row]) for name in FEATURE_ARRAYS}
        flat = np.empty(self.n_values, dtype="<f2")
        if self._fast_on:
            name = f"{self._chunk_root}/{row}/0"
            try:
                with open(name, "rb", buffering=0) as f:
                    if self._fast is None:
                        got = f.readinto(memoryview(flat).cast("B"))
                        if got != flat.nbytes or f.read(1):
                            raise FeatureStoreError(f"{self.path}: chunk of volume {volume_id} has the wrong size "
                                                    f"(damaged shard): rebuild it")
                    else:
                        self._fast(f.read(), flat)
            except FileNotFoundError:
                raise FeatureStoreError(f"{self.path}: chunk of volume {volume_id} is missing (damaged shard): "
                                        f"rebuild it") from None
        else:
            flat[:] = np.asarray(self._zarr[row])
        out: dict[str, np.ndarray] = {}
        for name, dtype, shape, a, b in self.specs:
            v = flat[a:b].reshape(shape)
            out[name] = v if dtype == np.float16 else v.astype(dtype)
        return out


class FeatureStore:
    """Lazy reader over many shards: `store[volume_id]` -> dict of the six arrays of that volume.

    Opening reads only each shard's group metadata (ids, provenance); a shard's array metadata is
    read on its first sample. A sample is one file read (see the module docstring). Safe to use from
    DataLoader worker processes (no open handles are kept).
    """

    def __init__(self, shard_paths: Iterable[Path | str]):
        self._shards: list[_Shard] = []
        self._index: dict[str, tuple[int, int]] = {}
        self.attrs: dict[str, Any] = {}
        for path in sorted(Path(p) for p in shard_paths):
            shard = _Shard(path)
            shard.check_features()
            gi = len(self._shards)
            self._shards.append(shard)
            for row, vid in enumerate(shard.volume_ids):
                if vid in self._index:
                    raise FeatureStoreError(f"{path}: volume {vid} is also in another shard")
                self._index[vid] = (gi, row)
            attrs = {k: v for k, v in shard.attrs.items() if k not in ("volume_ids", "complete")}
            if gi == 0:
                self.attrs = attrs
                continue
            for key in _CONSISTENT + ("layout",):
                if key == "layout" and not (attrs.get(key) and self.attrs.get(key)):
                    continue
                if attrs.get(key) != self.attrs.get(key):
                    raise FeatureStoreError(f"{path}: {key} = {attrs.get(key)!r} differs from "
                                            f"{self._shards[0].path} ({self.attrs.get(key)!r}): shards of "
                                            f"different caches cannot be mixed")

    @property
    def volume_ids(self) -> list[str]:
        return list(self._index)

    def __contains__(self, volume_id: object) -> bool:
        return volume_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, volume_id: str) -> dict[str, np.ndarray]:
        try:
            gi, row = self._index[volume_id]
        except KeyError:
            raise FeatureStoreError(f"volume {volume_id} is not in the feature cache") from None
        return self._shards[gi].read(row, volume_id)


# --- optional raw-token cache ----------------------------------------------------------------------

RAW_ARRAYS: tuple[str, ...] = ("tokens", "region_area", "mask_pooled", "mask_grid", "mask_present")
_RAW_DTYPES = {"tokens": np.float16, "region_area": np.float32, "mask_pooled": np.float16,
               "mask_grid": np.float16, "mask_present": np.bool_}


class RawTokenWriter(_AtomicShard):
    """Final-layer patch tokens (D, P, C) per volume plus what pooling needs besides them.

    `region_area` (R, D) is each region mask's area per slice (R2's slice choice); the mask arrays do
    not depend on the pooling mode and are copied into every pooled shard as they are.
    """

    def __init__(self, path: Path | str, attrs: Mapping[str, Any], capacity: int, compressor: str = "lz4"):
        self.capacity = max(1, int(capacity))
        self.codec = _codec(compressor)
        self.arrays: dict[str, zarr.Array] = {}
        super().__init__(path, {**attrs, "store_format": RAW_FORMAT, "compressor": compressor})

    def add(self, volume_id: str, arrays: Mapping[str, np.ndarray]) -> None:
        self._check_id(volume_id)
        i = len(self.volume_ids)
        for name in RAW_ARRAYS:
            a = np.asarray(arrays[name]).astype(_RAW_DTYPES[name], copy=False)
            arr = self.arrays.get(name)
            if arr is None:
                arr = self.arrays[name] = self.group.create_array(
                    name, shape=(self.capacity, *a.shape), chunks=(1, *a.shape), dtype=a.dtype,
                    compressors=[self.codec] if (self.codec is not None and a.dtype == np.float16) else "auto",
                    config={"write_empty_chunks": True},
                )
            if i >= arr.shape[0]:
                arr.resize((arr.shape[0] * 2, *arr.shape[1:]))
            arr[i] = a
        self.volume_ids.append(str(volume_id))

    def commit(self) -> list[str]:
        for arr in self.arrays.values():
            arr.resize((len(self.volume_ids), *arr.shape[1:]))
        self._finish({})
        return list(self.volume_ids)


class RawTokenStore:
    """Reader of one raw-token shard: `store[volume_id]` -> dict of `RAW_ARRAYS`."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        shard = _Shard(self.path)  # checks completeness
        if shard.attrs.get("store_format") != RAW_FORMAT:
            raise FeatureStoreError(f"{self.path}: not a raw-token cache")
        self.attrs = {k: v for k, v in shard.attrs.items() if k not in ("volume_ids", "complete")}
        self.volume_ids = shard.volume_ids
        self._rows = {v: i for i, v in enumerate(self.volume_ids)}
        self._group = zarr.open_group(str(self.path), mode="r") if self.volume_ids else None

    def __len__(self) -> int:
        return len(self.volume_ids)

    def __getitem__(self, volume_id: str) -> dict[str, np.ndarray]:
        row = self._rows[volume_id]
        return {name: np.asarray(self._group[name][row]) for name in RAW_ARRAYS}
