"""Reports to read: the generated-reports page (pipeline.report_samples) picks a reproducible sample that
always holds the best, median and worst volume by CA agreement, shows reference and generated text per
region with the labels marked, and renders in a real headless browser (Debian's chromium), which finds a
sample section and saves a screenshot; the per-class chart carries bootstrap intervals."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import report_samples as rs
from pipeline.constants import CTRATE_CLASSES, REGIONS


def _tables(n: int = 15, seed: int = 1) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    ids = [f"test_{i:03d}" for i in range(n)]
    refs = pd.DataFrame([{"volume_id": v, "findings": f"finding text {v}",
                          **{r: f"reference {r} of {v} <b>" for r in REGIONS}} for v in ids])
    preds = pd.DataFrame([{"volume_id": v, **{r: f"generated {r} of {v}" for r in REGIONS}, "report": "",
                           "raw": "", "empty_sections": 0, "duplicated_sections": 0, "repeated_sections": 0,
                           "degenerate": i == 2} for i, v in enumerate(ids)])
    ref = rng.random((n, len(CTRATE_CLASSES))) < 0.3
    pred = ref.copy()
    for i in range(n):  # volume i disagrees on i labels: agreement falls with i
        pred[i, :i] = ~pred[i, :i]
    scores = pd.DataFrame({"volume_id": ids, "report/BLEU-4 (evaluate)": rng.random(n),
                           **{f"reference label/{c}": ref[:, j].astype(int) for j, c in enumerate(CTRATE_CLASSES)},
                           **{f"prediction label/{c}": pred[:, j].astype(int) for j, c in enumerate(CTRATE_CLASSES)}})
    return preds, refs, scores


def test_sample_holds_best_median_worst_and_is_reproducible() -> None:
    _, _, scores = _tables()
    agreement = rs.ca_agreement(scores)
    picks = rs.choose_samples(agreement, 6, seed=3)
    roles = dict(picks)
    assert roles["test_000"] == "best" and roles["test_014"] == "worst" and roles["test_007"] == "median"
    assert len(picks) == 6 and list(roles.values()).count("random") == 3
    assert picks == rs.choose_samples(agreement, 6, seed=3)
    assert picks != rs.choose_samples(agreement, 6, seed=4)
    assert [v for v, _ in picks] == sorted(roles, key=lambda v: -agreement[v])  # best first
    assert len(rs.choose_samples(agreement, 100, seed=0)) == 15


def test_page_shows_texts_scores_and_marked_labels() -> None:
    preds, refs, scores = _tables()
    page = rs.samples_page("full", preds, refs, scores, n=4, seed=0)
    assert page.count('<section class="sample"') == 4
    assert "reference lung of test_000 &lt;b&gt;" in page  # escaped, never raw HTML from a report
    assert "generated heart of test_014" in page and "BLEU-4 (evaluate)" in page
    worst = page[page.index('id="sample-test_014"'):]
    assert worst.count("class='missed'") + worst.count("class='falsepos'") == 14  # its 14 disagreements


def test_chromium_renders_the_page_and_finds_a_sample(tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed (Debian: apt-get install chromium)")
    preds, refs, scores = _tables()
    page = tmp_path / "samples.html"
    page.write_text(rs.samples_page("full", preds, refs, scores, n=3, seed=0), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, encoding="utf-8",
                         errors="replace", timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert dom.stdout.count('<section class="sample"') == 3 and 'id="sample-test_000"' in dom.stdout
    shot = tmp_path / "samples.png"
    proc = subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                          capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert proc.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_per_class_chart_has_intervals_that_hold_the_estimate(tmp_path: Path) -> None:
    _, _, scores = _tables()
    last = CTRATE_CLASSES[-1]  # never flipped in _tables: the full model finds every positive
    data = rs.chart({"full": scores, "r2": scores.assign(**{f"prediction label/{last}": 0})},
                    tmp_path / "chart.png", n_resamples=200, seed=0)
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shown = data[data["support"] > 0]
    assert len(shown) > 0 and (shown["ci_low"] <= shown["f1"] + 1e-12).all() and (shown["f1"] <= shown["ci_high"] + 1e-12).all()
    by = {e: d.set_index("class") for e, d in data.groupby("experiment")}
    assert by["full"].loc[last, "support"] > 0
    assert by["full"].loc[last, "f1"] == 1.0 and by["r2"].loc[last, "f1"] == 0.0
