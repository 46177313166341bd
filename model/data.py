"""Dataset over the cached features + attribute prompts + reports, collator, length-grouped batches.

Token ids are computed once at construction (fast tokenizer, batched) and kept as int32 arrays, so
lengths are known up front for the length-grouped sampler and `__getitem__` only reads features.

Volumes a data stage skipped (`on_error: skip`, recorded in its QC table; `pipeline.skipped`) are left
out when passed as `skipped`; any other report volume without cached features or an attribute row is an
error naming it, so data is never dropped silently.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler

from model.prompt import (
    IGNORE_INDEX,
    build_example,
    build_prompt_text,
    end_of_turn_id,
    format_target,
    wrap_prompt,
)
from pipeline.constants import REGIONS, TOKEN_MASKS

if TYPE_CHECKING:  # zarr is imported only where a cache is read: the GPU benchmarks use the collator without it
    from pipeline.feature_store import FeatureStore


def read_parquets(paths: Sequence[str | Path], columns: Sequence[str] | None = None) -> pd.DataFrame:
    frames = [pd.read_parquet(p, columns=list(columns) if columns else None) for p in paths]
    if not frames:
        raise ValueError("no parquet files given")
    df = pd.concat(frames, ignore_index=True)
    if "volume_id" not in df.columns:
        raise ValueError(f"{[str(p) for p in paths]}: no volume_id column")
    dup = df["volume_id"][df["volume_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"duplicate volume_id(s) in {[str(p) for p in paths]}: {dup[:10]}")
    return df


def _missing_error(what: str, missing: list[str], n: int) -> ValueError:
    shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
    return ValueError(f"{len(missing)} of {n} report volume(s) have no {what} and no QC record of a skip: {shown}")


class ReportDataset(Dataset):
    """One item per report row: token ids, labels and the volume's cached features.

    `with_targets=False` builds prompt-only items (generation). With targets, a row whose target text
    is empty (stage 1: no findings; stage 2: all six region texts empty) is left out and counted in
    `n_empty_targets` (learning to stop at once teaches nothing); a target cut at `max_length` is kept
    up to the cut (no EOS) and counted in `n_truncated`. The prompt is never cut. Report rows of the
    volumes in `skipped` (skipped by a data stage) are left out first and listed in `skipped_ids`.
    """

    def __init__(
        self,
        store: FeatureStore,
        reports: pd.DataFrame,
        attributes: pd.DataFrame | None,
        tokenizer: Any,
        *,
        stage: int,
        use_mask_tokens: bool,
        use_attributes: bool,
        n_vision: int = 356,
        max_length: int = 2048,
        with_targets: bool = True,
        skipped: Collection[str] = (),
    ):
        self.store = store
        self.stage = stage
        self.use_mask_tokens = use_mask_tokens
        self.use_attributes = use_attributes
        self.with_targets = with_targets
        ids = [str(v) for v in reports["volume_id"]]
        if len(set(ids)) != len(ids):
            raise ValueError("duplicate volume_id in the reports")
        skipped = {str(v) for v in skipped}
        self.skipped_ids = [v for v in ids if v in skipped]
        if self.skipped_ids:
            kept_rows = [i for i, v in enumerate(ids) if v not in skipped]
            ids = [ids[i] for i in kept_rows]
            reports = reports.iloc[kept_rows]
        missing = [v for v in ids if v not in store]
        if missing:
            raise _missing_error("cached features", missing, len(ids))
        attr_text: dict[str, str] = {}
        if use_attributes:
            if attributes is None:
                raise ValueError("use_attributes is on but no attribute tables were given")
            attr_text = dict(
                zip(attributes["volume_id"].astype(str), attributes["prompt"].fillna("").astype(str))
            )
            missing = [v for v in ids if v not in attr_text]
            if missing:
                raise _missing_error("attribute row", missing, len(ids))
        if use_mask_tokens:
            cached = store.attrs.get("masks")
            if cached is not None and list(cached) != list(TOKEN_MASKS):
                lacking = [m for m in TOKEN_MASKS if m not in cached]
                raise ValueError(
                    f"volume {ids[0] if ids else '?'} (and every volume of this cache): the feature cache holds "
                    f"masks {list(cached)}, the prompt needs {list(TOKEN_MASKS)}"
                    + (f" (lacking {lacking})" if lacking else "")
                    + "; rebuild the features with the current regions table"
                )
        self.n_empty_targets = 0
        self.n_truncated = 0
        self.empty_target_ids: list[str] = []
        self.truncated_ids: list[str] = []
        if with_targets:
            rows = reports.to_dict("records")
            keep = [i for i, r in enumerate(rows) if not _target_is_empty(r, stage)]
            kept = set(keep)
            self.empty_target_ids = [v for i, v in enumerate(ids) if i not in kept]
            self.n_empty_targets = len(self.empty_target_ids)
            if ids and not keep:
                raise ValueError(f"all {len(ids)} report rows have an empty stage-{stage} target text")
            ids = [ids[i] for i in keep]
            reports = reports.iloc[keep]
        self.volume_ids = ids

        prompts = [
            build_prompt_text(
                attr_text.get(v),
                n_vision=n_vision,
                use_mask_tokens=use_mask_tokens,
                use_attributes=use_attributes,
            )
            for v in ids
        ]
        wrapped = [wrap_prompt(tokenizer, p) for p in prompts]
        enc = tokenizer([w for w, _ in wrapped], add_special_tokens=False)["input_ids"] if ids else []
        bos = tokenizer.bos_token_id
        prompt_ids = [
            ([bos] if (not has_bos and bos is not None and (not e or e[0] != bos)) else []) + list(e)
            for e, (_, has_bos) in zip(enc, wrapped)
        ]
        self.input_ids: list[np.ndarray] = []
        self.prompt_lengths: list[int] = []
        if with_targets:
            rows = reports.to_dict("records")
            targets = [format_target(r, stage) for r in rows]
            tenc = tokenizer(targets, add_special_tokens=False)["input_ids"] if ids else []
            eot = end_of_turn_id(tokenizer)  # the chat template's end-of-turn token, else EOS
            for vid, p, t in zip(ids, prompt_ids, tenc):
                target = list(t) + ([eot] if eot is not None else [])
                inp, _ = build_example(p, target, max_length)
                if len(inp) - len(p) < len(target):
                    self.n_truncated += 1
                    self.truncated_ids.append(vid)
                self.input_ids.append(np.asarray(inp, dtype=np.int32))
                self.prompt_lengths.append(len(p))
        else:
            for p in prompt_ids:
                if len(p) > max_length:
                    raise ValueError(f"prompt is {len(p)} tokens, longer than max_length={max_length}")
                self.input_ids.append(np.asarray(p, dtype=np.int32))
                self.prompt_lengths.append(len(p))
        self.lengths = [len(x) for x in self.input_ids]

    def __len__(self) -> int:
        return len(self.volume_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        vid = self.volume_ids[i]
        f = self.store[vid]
        ids = torch.from_numpy(self.input_ids[i].astype(np.int64))
        labels = ids.clone()
        labels[: self.prompt_lengths[i]] = IGNORE_INDEX
        item = {
            "volume_id": vid,
            "input_ids": ids,
            "labels": labels,
            # fp16 -> fp32 in torch: numpy's half cast is not vectorised (benchmarks/features_reader.py: ~5x)
            "vision": torch.cat([_fp32(f["global"]), _fp32(f["region"])], dim=0),
        }
        if self.use_mask_tokens:
            pooled, grid = self._mask_arrays(vid, f)
            item["mask_pooled"] = _fp32(pooled)
            item["mask_grid"] = _fp32(grid)
        return item

    @staticmethod
    def _mask_arrays(vid: str, f: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The volume's mask_pooled / mask_grid, one row per prompt mask, or an error naming the volume."""
        absent = [k for k in ("mask_pooled", "mask_grid") if k not in f]
        if absent:
            raise ValueError(f"volume {vid}: the feature cache has no {' / '.join(absent)} (mask tokens need them)")
        pooled, grid = f["mask_pooled"], f["mask_grid"]
        n = len(TOKEN_MASKS)
        if pooled.shape[0] != n or grid.shape[0] != n:
            raise ValueError(
                f"volume {vid}: the feature cache holds {pooled.shape[0]} mask_pooled / {grid.shape[0]} mask_grid "
                f"rows, the prompt has {n} <mask><pos> pairs ({', '.join(TOKEN_MASKS)})"
            )
        return pooled, grid


class Collator:
    """Pads to the longest sequence in the batch, not to max_length.

    Right padding for training, left padding for generation. With `pack=True` (training) the batch's
    samples are instead laid end to end in one row, nothing padded: `position_ids` restart at 0 for every
    sample, which makes transformers' causal mask block-diagonal (no sample attends to another), and
    `vision` / `mask_pooled` / `mask_grid` are concatenated in the same order, so each sample's placeholders
    take its own embeddings. Every sample starts with its prompt (labels ignored), so no position predicts
    across a boundary and the loss (mean over the batch's target tokens) is the padded batch's.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right", pack: bool = False):
        if padding_side not in ("left", "right"):
            raise ValueError("padding_side must be 'left' or 'right'")
        if pack and padding_side != "right":
            raise ValueError("packing is for training batches (right side)")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.pack = pack

    def _packed(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """One row of shape (1, sum of lengths): input_ids, labels, position_ids; features (1, k * n, ...)."""
        input_ids = torch.cat([torch.as_tensor(it["input_ids"], dtype=torch.long) for it in items])[None]
        labels = torch.cat([torch.as_tensor(it["labels"], dtype=torch.long) for it in items])[None]
        position_ids = torch.cat([torch.arange(len(it["input_ids"])) for it in items])[None]
        batch: dict[str, Any] = {
            "volume_ids": [it["volume_id"] for it in items],
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "position_ids": position_ids,
            "labels": labels,
            "vision": torch.cat([it["vision"] for it in items])[None],
        }
        if "mask_pooled" in items[0]:
            batch["mask_pooled"] = torch.cat([it["mask_pooled"] for it in items])[None]
            batch["mask_grid"] = torch.cat([it["mask_grid"] for it in items])[None]
        return batch

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.pack:
            return self._packed(items)
        n = max(len(it["input_ids"]) for it in items)
        b = len(items)
        input_ids = torch.full((b, n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((b, n), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((b, n), dtype=torch.long)
        for i, it in enumerate(items):
            k = len(it["input_ids"])
            sl = slice(n - k, n) if self.padding_side == "left" else slice(0, k)
            input_ids[i, sl] = it["input_ids"]
            labels[i, sl] = it["labels"]
            attention_mask[i, sl] = 1
        batch: dict[str, Any] = {
            "volume_ids": [it["volume_id"] for it in items],
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "vision": torch.stack([it["vision"] for it in items]),
        }
        if "mask_pooled" in items[0]:
            batch["mask_pooled"] = torch.stack([it["mask_pooled"] for it in items])
            batch["mask_grid"] = torch.stack([it["mask_grid"] for it in items])
        return batch


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length, in a seeded random order that changes with `set_epoch`.

    Indices are shuffled, cut into mega-batches of `mega * batch_size`, sorted by length inside each
    mega-batch and cut into batches; the batch order is shuffled and the longest batch goes first
    (an out-of-memory shows at step 1, not hours in). Padding waste stays small without giving up
    randomness.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
        mega: int = 50,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.lengths = np.asarray(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.mega = mega
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self) -> list[list[int]]:
        n = len(self.lengths)
        if not self.shuffle:
            order = np.argsort(-self.lengths, kind="stable")
            out = [order[i : i + self.batch_size].tolist() for i in range(0, n, self.batch_size)]
        else:
            rng = np.random.default_rng([self.seed, self.epoch])
            perm = rng.permutation(n)
            size = self.batch_size * self.mega
            out = []
            for s in range(0, n, size):
                chunk = perm[s : s + size]
                chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
                out += [
                    chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)
                ]
            order = rng.permutation(len(out))
            out = [out[i] for i in order]
            if out:
                longest = max(range(len(out)), key=lambda i: max(self.lengths[out[i]]))
                out.insert(0, out.pop(longest))
        if self.drop_last:
            out = [b for b in out if len(b) == self.batch_size]
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()


def _target_is_empty(row: dict[str, Any], stage: int) -> bool:
    cols = ("findings",) if stage == 1 else REGIONS
    return not any(_text(row.get(c)).strip() for c in cols)


def _text(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return str(x)


def build_dataset(
    features: Sequence[str | Path],
    attributes: Sequence[str | Path] | None,
    reports: str | Path,
    tokenizer: Any,
    *,
    stage: int,
    use_mask_tokens: bool,
    use_attributes: bool,
    n_vision: int = 356,
    max_length: int = 2048,
    with_targets: bool = True,
    store: FeatureStore | None = None,
    skipped: Collection[str] = (),
) -> ReportDataset:
    from pipeline.feature_store import FeatureStore

    store = store if store is not None else FeatureStore(features)
    rep = read_parquets([reports])
    if with_targets:
        needed = ("findings",) if stage == 1 else REGIONS
        absent = [c for c in needed if c not in rep.columns]
        if absent:
            raise ValueError(f"{reports}: column(s) {absent} missing")
    attr = (
        read_parquets(attributes, columns=["volume_id", "prompt"])
        if (use_attributes and attributes)
        else None
    )
    return ReportDataset(
        store,
        rep,
        attr,
        tokenizer,
        stage=stage,
        use_mask_tokens=use_mask_tokens,
        use_attributes=use_attributes,
        n_vision=n_vision,
        max_length=max_length,
        with_targets=with_targets,
        skipped=skipped,
    )


def _fp32(a: np.ndarray) -> torch.Tensor:
    """A cached array (fp16 tokens, bool occupancy) as a contiguous float32 tensor."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.bool_:
        a = a.view(np.uint8)
    return torch.from_numpy(a).float()
