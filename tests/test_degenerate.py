"""Degenerate generations (pipeline/evaluate/degenerate.py): per-volume counts on hand-made predictions,
the metrics.json block, the ablation-table mark and note. ~2 s."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
from helpers import REPO, fake_metrics

from model.prompt import parse_structured
from pipeline.constants import REGIONS
from pipeline.evaluate.degenerate import (
    COLUMNS,
    MARKER,
    degeneracy_columns,
    degenerate_block,
    section_counts,
)
from pipeline.evaluate.table import build_table, write_tables

GOOD = ("[Lung]: A 6 mm nodule in the right upper lobe. [Airways]: Trachea is patent. "
        "[Mediastinum]: No lymphadenopathy. [Heart]: Heart size is normal. "
        "[Osseous]: No lytic lesion. [Abdomen]: Liver is unremarkable.")


def counts(raw: str) -> dict:
    """What model.generate records for a generated text: parsed as it parses it."""
    return section_counts(parse_structured(raw), raw)


def test_a_normal_report_is_not_degenerate():
    assert counts(GOOD) == {"empty_sections": 0, "duplicated_sections": 0, "repeated_sections": 0,
                            "degenerate": False}


@pytest.mark.parametrize(
    "raw, expected",
    [
        # only headings: six empty sections
        ("[Lung]: [Airways]: [Mediastinum]: [Heart]: [Osseous]: [Abdomen]:", (6, 0, 0, True)),
        # no heading at all: nothing lands in a section
        ("The lungs are clear. No effusion.", (6, 0, 0, True)),
        # one text pasted into every region (case and final period ignored): 5 copies of the first
        ("".join(f"[{h}]: No abnormality{'.' if i % 2 else ''} " for i, h in
                 enumerate(("Lung", "Airways", "Mediastinum", "Heart", "Osseous", "ABDOMEN"))), (0, 5, 0, True)),
        # two identical sections: one copy, not degenerate
        (GOOD.replace("Trachea is patent.", "Heart size is normal."), (0, 1, 0, False)),
        # a decoding loop inside one section
        (GOOD.replace("No lytic lesion.", "No lytic lesion. No lytic lesion. No lytic lesion."), (0, 0, 1, False)),
        # a heading written twice (different bodies): repeated, the bodies appended as parse_structured does
        (GOOD + " [Lung]: Mild emphysema.", (0, 0, 1, False)),
        # two empty + one copy: three of six sections carry nothing of their own
        ("[Lung]: Clear lungs. [Airways]: Clear lungs. [Heart]: Normal heart. [Osseous]: Intact bones.",
         (2, 1, 0, True)),
        # two empty + one looping section: degenerate too
        ("[Lung]: Clear. Clear. [Airways]: Patent. [Heart]: Normal. [Osseous]: Intact.", (2, 0, 1, True)),
        # a section both empty-free and repeated and duplicated counts once towards the flag
        ("[Lung]: Clear. Clear. [Airways]: Clear. Clear. [Mediastinum]: A. [Heart]: B. [Osseous]: C. [Abdomen]: D.",
         (0, 1, 2, False)),
    ],
)
def test_section_counts(raw, expected):
    got = counts(raw)
    assert (got["empty_sections"], got["duplicated_sections"], got["repeated_sections"], got["degenerate"]) == expected


def _predictions(raws: list[str]) -> pd.DataFrame:
    rows = [{"volume_id": f"v{i}", **parse_structured(r), "raw": r} for i, r in enumerate(raws)]
    return pd.DataFrame(rows, columns=["volume_id", *REGIONS, "raw"])


def test_columns_and_block():
    only_heads = "[Lung]: [Airways]: [Heart]:"
    pred = _predictions([GOOD, only_heads, only_heads, GOOD])
    cols = degeneracy_columns(pred)
    assert list(cols.columns) == list(COLUMNS)
    assert cols["degenerate"].tolist() == [False, True, True, False]
    assert cols["empty_sections"].tolist() == [0, 6, 6, 0]
    # exactly half is not "mostly"
    block = degenerate_block(pred.join(cols))
    assert (block["n_volumes"], block["n_degenerate"], block["fraction"], block["mostly_degenerate"]) == (4, 2, 0.5, False)
    assert block["sections"]["empty_sections"] == 12 and block["volumes_with"]["empty_sections"] == 2
    # three of four: mostly degenerate; the block counts from the regions when the columns are absent
    block = degenerate_block(_predictions([GOOD, only_heads, only_heads, only_heads]))
    assert block["fraction"] == 0.75 and block["mostly_degenerate"] is True
    assert "MOSTLY DEGENERATE" in block["note"] and "3 of 4" in block["note"]
    # the table's columns win over recounting (they are what generation recorded)
    written = pred.join(cols)
    written["degenerate"] = True
    assert degenerate_block(written)["n_degenerate"] == 4


def test_table_marks_a_mostly_degenerate_experiment(tmp_path):
    ok, broken, old = (fake_metrics(n, 0.3, 0.3, 0.3, 0.3) for n in ("ours", "broken", "old"))
    ok["degenerate"] = degenerate_block(_predictions([GOOD, GOOD, "[Lung]:"]))
    broken["degenerate"] = degenerate_block(_predictions(["[Lung]:", "[Lung]:", GOOD]))
    # `old`: a metrics.json from before the block existed: no mark, no fraction
    df, impls, loaded = build_table([ok, broken, old])
    assert df[MARKER].tolist() == [False, True, None]
    assert df["degenerate fraction"].iloc[:2].tolist() == pytest.approx([1 / 3, 2 / 3], abs=1e-4)
    write_tables(df, impls, tmp_path, loaded)
    md = (tmp_path / "ablation.md").read_text(encoding="utf-8")
    assert f"| broken (*{MARKER}*) |" in md and "| ours |" in md and "| old |" in md
    assert "**Mostly degenerate outputs**" in md and "broken (67% of volumes)" in md and "ours (" not in md
    csv = pd.read_csv(tmp_path / "ablation.csv")
    assert csv[MARKER].tolist()[:2] == [False, True] and pd.isna(csv[MARKER].iloc[2])
    # nothing degenerate: no note
    df, impls, loaded = build_table([ok])
    write_tables(df, impls, tmp_path / "clean", loaded)
    assert "Mostly degenerate" not in (tmp_path / "clean" / "ablation.md").read_text(encoding="utf-8")


def test_evaluate_cli_writes_the_block(tmp_path):
    """metrics.json from `python -m pipeline.evaluate`: the degenerate block from the predictions' columns."""
    pred = _predictions([GOOD, "[Lung]: [Heart]:", GOOD])
    pred["report"] = [" ".join(t for t in r if t) for r in pred[list(REGIONS)].itertuples(index=False)]
    pred = pred.join(degeneracy_columns(pred))
    ref = pred[["volume_id", *REGIONS]].copy()
    ref["findings"] = [" ".join(parse_structured(GOOD).values())] * 3
    pred.to_parquet(tmp_path / "pred.parquet")
    ref.to_parquet(tmp_path / "ref.parquet")
    out = tmp_path / "metrics.json"
    r = subprocess.run([sys.executable, "-m", "pipeline.evaluate", "--predictions", str(tmp_path / "pred.parquet"),
                        "--references", str(tmp_path / "ref.parquet"), "--experiment", "x", "--out", str(out),
                        "--params-json", '{"java": "/nonexistent/java"}'],
                       cwd=REPO, capture_output=True, encoding="utf-8", errors="replace", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads(out.read_text(encoding="utf-8"))
    assert m["degenerate"]["n_degenerate"] == 1 and m["degenerate"]["mostly_degenerate"] is False
    assert m["n_skipped_volumes"] == 0 and m["skipped"]["by_stage"] == {}
    assert "degenerate: 1 of 3" in r.stdout
