"""Reading and pairing predictions with references, tolerant of the inputs real runs produce.

Predictions: parquet, CSV or JSON-lines with ``volume_id`` and ``report`` (the merged report) and, when
available, one column per region (REGIONS). References: ``volume_id``, ``findings``, the region columns and
optionally the 18 CT-RATE label columns (the reports stage's ``results/reports/test.parquet``).

Rules (each reported in metrics.json ``inputs``, never silent):
  * a prediction whose ``volume_id`` has no reference is **reported, not scored** (count + ids);
    references without a prediction are counted; no pair at all is an error;
  * duplicate ``volume_id`` rows in either file are an error (which one would be scored?);
  * a missing region column counts as empty text for every volume (named in ``missing_region_columns``);
    a file with no region column at all gets its region texts from its merged text by the sentence ->
    region classifier (:mod:`pipeline.evaluate.sections`; ``region_texts_from_classifier``); a prediction
    file without ``report`` gets it by joining its region texts in REGIONS order;
  * text cells: None/NaN -> ""; bytes are decoded as UTF-8, else as cp1252 (with replacement); strings
    carrying undecodable bytes (``surrogateescape``) are repaired the same way; NUL and other control
    characters -> space. Every repaired cell is counted (``n_text_cells_repaired``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.constants import CTRATE_CLASSES, REGIONS

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
MAX_LISTED_IDS = 200


def clean_text(x: Any) -> tuple[str, bool]:
    """(text, repaired) for one cell; see the module docstring."""
    repaired = False
    if x is None or (isinstance(x, float) and np.isnan(x)) or x is pd.NA:
        return "", False
    if isinstance(x, (bytes, bytearray, memoryview)):
        raw = bytes(x)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            s, repaired = raw.decode("cp1252", errors="replace"), True
    else:
        s = str(x)
        if _SURROGATE.search(s):
            raw = s.encode("utf-8", errors="surrogateescape") if _is_escaped(s) else s.encode("utf-8", "replace")
            try:
                s = raw.decode("utf-8")
            except UnicodeDecodeError:
                s = raw.decode("cp1252", errors="replace")
            s = _SURROGATE.sub("\ufffd", s)
            repaired = True
    if _CONTROL.search(s):
        s, repaired = _CONTROL.sub(" ", s), True
    return s, repaired


def _is_escaped(s: str) -> bool:
    """Only low surrogates U+DC80..U+DCFF (what surrogateescape makes of undecodable bytes)?"""
    return all("\udc80" <= c <= "\udcff" for c in _SURROGATE.findall(s))


def read_table(path: str | Path) -> pd.DataFrame:
    """A predictions/references table from .parquet, .csv or .jsonl (CSV bytes that are not UTF-8 survive)."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        return pd.read_parquet(path)
    if suffix in (".csv", ".csv.gz"):
        # object dtype: pandas 3 string columns cannot hold the escaped bytes
        return pd.read_csv(path, dtype=object, keep_default_na=False, encoding="utf-8", encoding_errors="surrogateescape")
    if suffix in (".jsonl", ".json"):
        return pd.read_json(path, lines=suffix == ".jsonl", dtype=False, encoding_errors="surrogateescape")
    raise ValueError(f"{path}: unsupported table type (use .parquet, .csv or .jsonl)")


@dataclass
class Pairs:
    """Predictions joined to references; text columns cleaned."""

    frame: pd.DataFrame  # volume_id, report, findings, <region>_pred, <region>_ref, label columns
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def references(self) -> list[str]:
        return self.frame["findings"].tolist()

    @property
    def predictions(self) -> list[str]:
        return self.frame["report"].tolist()

    @property
    def volume_ids(self) -> list[str]:
        return self.frame["volume_id"].tolist()


def _check_ids(name: str, df: pd.DataFrame) -> pd.Series:
    if "volume_id" not in df.columns:
        raise ValueError(f"{name} lack a volume_id column")
    ids = df["volume_id"].map(lambda v: clean_text(v)[0].strip())
    dup = ids[ids.duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{name} have duplicate volume_id(s): {dup[:10]}")
    return ids


def _clean_column(series: pd.Series) -> tuple[list[str], int]:
    out, n = [], 0
    for v in series.tolist():
        s, rep = clean_text(v)
        out.append(s)
        n += rep
    return out, n


def _regions_from_text(df: pd.DataFrame, column: str) -> pd.DataFrame:
    from pipeline.evaluate.sections import split_report

    parts = [split_report(clean_text(v)[0]) for v in df[column].tolist()]
    return df.assign(**{r: [p[r] for p in parts] for r in REGIONS})


def pair_frames(pred: pd.DataFrame, ref: pd.DataFrame) -> Pairs:
    """Join predictions to references on volume_id under the rules of the module docstring."""
    if pred.empty:
        raise ValueError("predictions are empty")
    pred_ids, ref_ids = _check_ids("predictions", pred), _check_ids("references", ref)
    if "findings" not in ref.columns:
        raise ValueError("references lack a findings column")
    repaired = 0
    missing_cols: dict[str, list[str]] = {"predictions": [], "references": []}

    p = pd.DataFrame({"volume_id": pred_ids})
    classified: list[str] = []
    if "report" in pred.columns and not any(r in pred.columns for r in REGIONS):
        pred = _regions_from_text(pred, "report")
        classified.append("predictions")
    if not any(r in ref.columns for r in REGIONS):
        ref = _regions_from_text(ref, "findings")
        classified.append("references")
    for region in REGIONS:
        if region in pred.columns:
            p[f"{region}_pred"], n = _clean_column(pred[region])
            repaired += n
        else:
            p[f"{region}_pred"] = ""
            missing_cols["predictions"].append(region)
    if "report" in pred.columns:
        p["report"], n = _clean_column(pred["report"])
        repaired += n
    elif len(missing_cols["predictions"]) < len(REGIONS):
        p["report"] = [" ".join(t for t in row if t.strip()) for row in p[[f"{r}_pred" for r in REGIONS]].itertuples(index=False)]
        missing_cols["predictions"].append("report (joined from the region columns)")
    else:
        raise ValueError("predictions have neither a report column nor any region column")

    r = pd.DataFrame({"volume_id": ref_ids})
    r["findings"], n = _clean_column(ref["findings"])
    repaired += n
    for region in REGIONS:
        if region in ref.columns:
            r[f"{region}_ref"], n = _clean_column(ref[region])
            repaired += n
        else:
            r[f"{region}_ref"] = ""
            missing_cols["references"].append(region)
    label_cols = [c for c in CTRATE_CLASSES if c in ref.columns]
    for c in label_cols:
        r[c] = pd.to_numeric(ref[c], errors="coerce").to_numpy()

    ref_set, pred_set = set(r["volume_id"]), set(p["volume_id"])
    orphan = [v for v in p["volume_id"] if v not in ref_set]
    joined = p[p["volume_id"].isin(ref_set)].merge(r, on="volume_id", how="left", validate="1:1")
    if joined.empty:
        shown = ", ".join(orphan[:20]) + (" ..." if len(orphan) > 20 else "")
        raise ValueError(f"none of the {len(p)} prediction volume_id(s) has a reference: {shown}")
    joined = joined.reset_index(drop=True)
    report = {
        "n_predictions": int(len(p)),
        "n_references": int(len(r)),
        "n_scored": int(len(joined)),
        "predictions_without_reference": {
            "count": len(orphan),
            "volume_ids": orphan[:MAX_LISTED_IDS],
            "note": "reported, not scored",
        },
        "n_references_without_prediction": int(len(ref_set - pred_set)),
        "n_prediction_empty": int(sum(not t.strip() for t in joined["report"])),
        "n_reference_empty": int(sum(not t.strip() for t in joined["findings"])),
        "n_text_cells_repaired": int(repaired),
        "missing_region_columns": {k: v for k, v in missing_cols.items() if v},
        "region_texts_from_classifier": classified,
        "reference_label_columns": len(label_cols),
    }
    return Pairs(joined, report)


def load_pairs(predictions: str | Path, references: str | Path) -> Pairs:
    return pair_frames(read_table(predictions), read_table(references))
