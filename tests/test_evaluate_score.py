"""`python -m pipeline.evaluate score` on outside tables of report pairs: bad ids, duplicates, empty texts,
non-UTF-8 bytes, missing columns (~15 s: in-process, Java pointed at a missing executable)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from pipeline.evaluate import hf_evaluate
from pipeline.evaluate.run import main

NO_JAVA = ["--java", "/nonexistent/bin/java", "--bootstrap-resamples", "200"]


def _write_bad_csvs(tmp_path: Path) -> tuple[Path, Path]:
    pred = tmp_path / "peer_outputs.csv"
    ref = tmp_path / "references.csv"
    # rows: a, b (twice: duplicated), an id-less row, c (empty text), d (cp1252 bytes), e (no reference)
    pred.write_bytes(
        b"case,generated\n"
        b"a,The heart is normal in size. No pleural effusion.\n"
        b"b,Nodule in the right upper lobe.\n"
        b"b,Nodule in the left upper lobe.\n"
        b",Orphan text without an id.\n"
        b"c,\n"
        b"d,Caf\xe9-like \x96 dash in the lung report.\n"
        b"e,No reference for this one.\n"
    )
    ref.write_bytes(
        b"case,report_text\n"
        b"a,Heart size is normal. No pleural effusion.\n"
        b"b,A nodule in the right upper lobe.\n"
        b"c,Mild emphysema.\n"
        b"d,Dash in the lung report.\n"
        b"f,Reference without a prediction.\n"
    )
    return pred, ref


def test_score_reports_bad_rows_and_scores_each_pair_once(tmp_path, capsys):
    pred, ref = _write_bad_csvs(tmp_path)
    out, per_pair = tmp_path / "scores.json", tmp_path / "per_pair.csv"
    rc = main(["score", "--predictions", str(pred), "--references", str(ref), "--id-column", "case",
               "--pred-column", "generated", "--ref-column", "report_text", "--out", str(out),
               "--per-pair", str(per_pair), *NO_JAVA])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = json.loads(out.read_text(encoding="utf-8"))
    inp = result["inputs"]
    # a, c, d scored; b duplicated (both rows out), the id-less row out, e and f unpaired
    assert result["n_pairs"] == 3
    assert inp["predictions"]["n_rows"] == 7 and inp["predictions"]["rows_without_id"] == [4]
    assert inp["predictions"]["duplicated_ids"] == ["b"] and inp["predictions"]["n_rows_with_duplicated_id"] == 2
    assert inp["predictions"]["n_text_cells_repaired"] == 1
    assert inp["predictions_without_reference"] == ["e"] and inp["n_references_without_prediction"] == 2  # b, f
    assert inp["n_prediction_empty"] == 1
    rows = pd.read_csv(per_pair, keep_default_na=False)
    assert list(rows["case"]) == ["a", "c", "d"]  # nothing twice, prediction-file order
    assert rows.loc[1, "BLEU-4 evaluate"] == 0.0  # the empty prediction
    expected = hf_evaluate.bleu_per_report(["Heart size is normal. No pleural effusion."],
                                           ["The heart is normal in size. No pleural effusion."], 4)[4][0]
    assert rows.loc[0, "BLEU-4 evaluate"] == pytest.approx(expected)
    # every variant is there with its label; the jar reads "not run" with the reason, the rest computed
    metrics = result["metrics"]
    assert metrics["METEOR"]["status"] == "not run" and "/nonexistent/bin/java" in metrics["METEOR"]["reason"]
    for key in ("BLEU-4 evaluate", "ROUGE-L evaluate", "CIDEr-D", "METEOR-NLTK report-mean", "BLEU-4"):
        assert metrics[key]["value"] is not None and metrics[key]["implementation"], key
        assert metrics[key]["ci95"] is not None, key
    # the messages name the file and the rows / ids
    assert f"{pred}: id 'b' on rows [2, 3]" in captured.err
    assert f"{pred}: 1 row(s) without an id" in captured.err and "rows [4]" in captured.err
    assert "not valid UTF-8" in captured.err and "'e'" in captured.err and "'f'" in captured.err
    assert "3 pairs scored" in captured.out


def test_score_one_parquet_with_both_columns(tmp_path, capsys):
    path = tmp_path / "pairs.parquet"
    pd.DataFrame({"volume_id": ["x", "y"], "report": ["heart normal", "lungs clear"],
                  "findings": ["the heart is normal", "the lungs are clear"]}).to_parquet(path)
    rc = main(["score", "--predictions", str(path), "--references", str(path), "--out", str(tmp_path / "o.json"),
               *NO_JAVA])
    assert rc == 0
    assert json.loads((tmp_path / "o.json").read_text(encoding="utf-8"))["n_pairs"] == 2


def test_score_bad_input_errors(tmp_path, capsys):
    pred, ref = _write_bad_csvs(tmp_path)
    rc = main(["score", "--predictions", str(pred), "--references", str(ref), *NO_JAVA])
    err = capsys.readouterr().err
    assert rc == 2 and f"{pred}: no id column 'volume_id'" in err and "case, generated" in err
    rc = main(["score", "--predictions", str(pred), "--references", str(ref), "--id-column", "case",
               "--pred-column", "generated", "--ref-column", "nope", *NO_JAVA])
    assert rc == 2 and f"{ref}: no ref column 'nope'" in capsys.readouterr().err
    rc = main(["score", "--predictions", str(tmp_path / "missing.csv"), "--references", str(ref), *NO_JAVA])
    assert rc == 2 and "missing.csv: no such file" in capsys.readouterr().err
    other = tmp_path / "other.csv"
    other.write_text("case,report_text\nzzz,text\n", encoding="utf-8")
    rc = main(["score", "--predictions", str(pred), "--references", str(other), "--id-column", "case",
               "--pred-column", "generated", "--ref-column", "report_text", *NO_JAVA])
    assert rc == 2 and "nothing to score" in capsys.readouterr().err
    # a WordNet folder named explicitly must exist
    rc = main(["score", "--predictions", str(pred), "--references", str(ref), "--wordnet", str(tmp_path / "nown"),
               *NO_JAVA])
    assert rc == 2 and "nown" in capsys.readouterr().err
