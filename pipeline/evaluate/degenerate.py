"""Degenerate generations: empty, duplicated and repeated sections per volume, and a flag.

A generated report has six sections (`[Lung]: ... [Abdomen]: ...`, parsed into the six region columns of
`predictions.parquet`). Per volume, `model.generate` adds:

- `empty_sections`: sections with no text (missing heading, or a heading with nothing after it);
- `duplicated_sections`: non-empty sections whose text (case, spacing and end punctuation ignored) is
  the same as an earlier section's: six copies of "No abnormality." count 5, two count 1;
- `repeated_sections`: sections whose heading appears more than once in the generated text, or in which
  a sentence is written more than once (a decoding loop);
- `degenerate`: at least `MIN_BAD_SECTIONS` (3) of the six sections are empty, duplicated or repeated
  (a section counted once however many of these it is). Only headings, no headings at all, or one text
  pasted into every region are all degenerate.

An experiment is *mostly degenerate* when more than `MOSTLY_DEGENERATE` (half) of its volumes are:
its NLG and clinical scores then measure a broken generator, not report quality. `metrics.json` gets
the `degenerate` block (`degenerate_block`) and the ablation tables mark the experiment
(`table_columns`, `table_note`).

Written here because no library counts these: they depend on this project's section format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pandas as pd

from pipeline.constants import REGION_HEADERS, REGIONS
from pipeline.evaluate.sections import split_sentences

MIN_BAD_SECTIONS = 3  # of 6: half the report carries nothing of its own
MOSTLY_DEGENERATE = 0.5  # fraction of volumes above which an experiment is marked
COLUMNS = ("empty_sections", "duplicated_sections", "repeated_sections", "degenerate")
MARKER = "mostly degenerate"

_HEADER_TO_REGION = {h.lower(): r for r, h in REGION_HEADERS.items()}
_HEADER_RE = re.compile(r"\[\s*(" + "|".join(re.escape(h) for h in REGION_HEADERS.values()) + r")\s*\]", re.IGNORECASE)
_EDGE_PUNCT = re.compile(r"^[\s.,;:!?]+|[\s.,;:!?]+$")


def _norm(text: str) -> str:
    return _EDGE_PUNCT.sub("", " ".join(text.lower().split()))


def _text(x: Any) -> str:
    return x if isinstance(x, str) else ""


def section_counts(regions: Mapping[str, Any], raw: Any = None) -> dict[str, int | bool]:
    """The four columns of one volume from its six region texts and (if any) its raw generated text."""
    texts = {r: _text(regions.get(r)).strip() for r in REGIONS}
    empty = {r for r in REGIONS if not texts[r]}
    seen: set[str] = set()
    duplicated: set[str] = set()
    for r in REGIONS:
        if r in empty:
            continue
        key = _norm(texts[r])
        if key in seen:
            duplicated.add(r)
        seen.add(key)
    heads = [_HEADER_TO_REGION[m.group(1).lower()] for m in _HEADER_RE.finditer(_text(raw))]
    repeated = {r for r in REGIONS if heads.count(r) > 1}
    for r in REGIONS:
        sentences = [_norm(s) for s in split_sentences(texts[r])]
        sentences = [s for s in sentences if s]
        if len(sentences) != len(set(sentences)):
            repeated.add(r)
    bad = empty | duplicated | repeated
    return {"empty_sections": len(empty), "duplicated_sections": len(duplicated),
            "repeated_sections": len(repeated), "degenerate": len(bad) >= MIN_BAD_SECTIONS}


def degeneracy_columns(predictions: pd.DataFrame) -> pd.DataFrame:
    """The four columns for every row of a predictions table (region columns, optional `raw`)."""
    rows = []
    for rec in predictions.to_dict("records"):
        rows.append(section_counts(rec, rec.get("raw")))
    out = pd.DataFrame(rows, columns=list(COLUMNS), index=predictions.index)
    return out.astype({c: ("bool" if c == "degenerate" else "int64") for c in COLUMNS})


def degenerate_block(predictions: pd.DataFrame) -> dict[str, Any]:
    """The `degenerate` block of metrics.json: counts over all predictions and whether the experiment
    is mostly degenerate. Uses the table's columns when `model.generate` wrote them, else counts here."""
    have = all(c in predictions.columns for c in COLUMNS)
    cols = predictions[list(COLUMNS)] if have else degeneracy_columns(predictions)
    n = int(len(cols))
    n_deg = int(cols["degenerate"].astype(bool).sum())
    fraction = n_deg / n if n else 0.0
    mostly = fraction > MOSTLY_DEGENERATE
    return {
        "n_volumes": n,
        "n_degenerate": n_deg,
        "fraction": round(fraction, 4),
        "mostly_degenerate": bool(mostly),
        "volumes_with": {c: int((cols[c] > 0).sum()) for c in COLUMNS[:3]},
        "sections": {c: int(cols[c].sum()) for c in COLUMNS[:3]},
        "definition": (
            f"a volume is degenerate when at least {MIN_BAD_SECTIONS} of its 6 sections are empty, a copy of an "
            "earlier section, or repeated (heading written twice, or a sentence repeated within the section); "
            f"an experiment is mostly degenerate when more than {MOSTLY_DEGENERATE:.0%} of its volumes are"
        ),
        "note": (f"{n_deg} of {n} generated reports are degenerate ({fraction:.0%}): "
                 + ("MOSTLY DEGENERATE - the scores describe a broken generator, not report quality"
                    if mostly else "not mostly degenerate")),
    }


def table_columns(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Ablation-table cells of one experiment: the degenerate fraction and the mark (None when the
    metrics.json has no `degenerate` block)."""
    block = metrics.get("degenerate") or {}
    if not block:
        return {"degenerate fraction": None, MARKER: None}
    return {"degenerate fraction": float(block["fraction"]), MARKER: bool(block["mostly_degenerate"])}


def is_marked(value: Any) -> bool:
    """A table cell of the `MARKER` column: True only for a mostly degenerate experiment (not None / NaN)."""
    return value is not None and not pd.isna(value) and bool(value)


def table_note(table: pd.DataFrame) -> str:
    """One sentence under the ablation table naming its mostly degenerate experiments ('' if none);
    `table` has the columns `experiment`, `degenerate fraction` and `MARKER` (`table_columns`)."""
    if MARKER not in table.columns:
        return ""
    marked = [f"{r['experiment']} ({r['degenerate fraction']:.0%} of volumes)"
              for _, r in table.iterrows() if is_marked(r[MARKER])]
    if not marked:
        return ""
    return (f"**Mostly degenerate outputs** (marked *{MARKER}*): {', '.join(marked)}. More than "
            f"{MOSTLY_DEGENERATE:.0%} of these experiments' reports have at least {MIN_BAD_SECTIONS} of 6 sections "
            "empty, duplicated or repeated; their scores describe a broken generator, not report quality.")
