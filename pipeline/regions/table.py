"""The label table: structure name -> channel bit word per vocabulary, and which vocabulary a set of
names belongs to (config/regions.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from pipeline.constants import CHANNELS
from pipeline.io import InputError

DEFAULT_VOCABULARY = "radgenome"


@dataclass(frozen=True)
class Vocabulary:
    bits: dict[str, int]
    unused: dict[str, str]

    def classify(self, name: str) -> str:
        if name in self.bits:
            return "used"
        return "unused" if name in self.unused else "unknown"

    @property
    def names(self) -> list[str]:
        return sorted([*self.bits, *self.unused])


@dataclass(frozen=True)
class LabelTable:
    """Structure name -> channel bit word, per vocabulary; names left out on purpose, with reasons.

    `bits` / `unused` are the default (`radgenome`) vocabulary's.
    """

    version: int
    bits: dict[str, int]
    unused: dict[str, str]
    vocabularies: dict[str, Vocabulary] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | str) -> LabelTable:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        channels = tuple(raw["channels"])
        if channels != CHANNELS:
            raise ValueError(f"{path}: channels {channels} differ from pipeline.constants.CHANNELS")
        index = {c: i for i, c in enumerate(channels)}
        vocabularies: dict[str, Vocabulary] = {}
        for vname, section in raw["vocabularies"].items():
            bits: dict[str, int] = {}
            for name, chans in (section.get("structures") or {}).items():
                unknown = [c for c in chans if c not in index]
                if unknown or not chans:
                    raise ValueError(f"{path}: {vname} structure {name!r} maps to unknown channels {unknown}")
                bits[str(name)] = int(sum(1 << index[c] for c in set(chans)))
            unused = {str(k): str(v) for k, v in (section.get("unused") or {}).items()}
            both = set(bits) & set(unused)
            if both:
                raise ValueError(f"{path}: {vname} names both used and unused: {sorted(both)}")
            vocabularies[str(vname)] = Vocabulary(bits, unused)
        if DEFAULT_VOCABULARY not in vocabularies:
            raise ValueError(f"{path}: no {DEFAULT_VOCABULARY!r} vocabulary")
        default = vocabularies[DEFAULT_VOCABULARY]
        return cls(int(raw["version"]), default.bits, default.unused, vocabularies)

    def vocabulary(self, name: str = DEFAULT_VOCABULARY) -> Vocabulary:
        if name not in self.vocabularies:
            raise ValueError(f"label table has no vocabulary {name!r} (has {sorted(self.vocabularies)})")
        return self.vocabularies[name]

    def classify(self, name: str, vocabulary: str = DEFAULT_VOCABULARY) -> str:
        return self.vocabulary(vocabulary).classify(name)


def unpack_channel(labels: np.ndarray, channel: str) -> np.ndarray:
    """Boolean mask of one channel from the packed array."""
    return (labels >> np.uint32(CHANNELS.index(channel))) & np.uint32(1) == 1


def channel_names(word: int) -> list[str]:
    return [c for i, c in enumerate(CHANNELS) if word >> i & 1]


AUTO_VOCABULARY = "auto"


def detect_vocabulary(names: Sequence[str], table: LabelTable) -> str:
    """The table vocabulary that knows (uses or deliberately leaves out) most of `names`; the default
    (`radgenome`) on a tie. RadGenome / SAT names are words with spaces ("left lung upper lobe"),
    TotalSegmentator's are snake_case ("lung_upper_lobe_left"): the two barely overlap."""
    scores = {v: sum(vocab.classify(n) != "unknown" for n in names) for v, vocab in table.vocabularies.items()}
    best = max(scores.values(), default=0)
    if scores.get(DEFAULT_VOCABULARY) == best:
        return DEFAULT_VOCABULARY
    return next(v for v, s in scores.items() if s == best)


def check_known(names: Sequence[str], table: LabelTable, vocabulary: str, volume_id: str, source: Path | str,
                what: str = "structure names") -> list[str]:
    """The names the vocabulary does not know; an InputError when they are most of them (a wrong
    vocabulary or another segmenter's output: the volume's regions would be mostly empty)."""
    vocab = table.vocabulary(vocabulary)
    unknown = sorted(n for n in set(names) if vocab.classify(n) == "unknown")
    if names and 2 * len(unknown) > len(set(names)):
        raise InputError(
            f"volume {volume_id}: {len(unknown)} of {len(set(names))} {what} in {source} are not in the label "
            f"table's {vocabulary!r} vocabulary: {unknown}. Set segmentation.vocabulary "
            f"({', '.join(table.vocabularies)}) if the detection was wrong, or map the names in the label table")
    return unknown
