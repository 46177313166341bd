"""`snakemake --report` on a finished demo run (a copy of the session's `demo_run`).

A name ending in .html gives one self-contained HTML file (every result embedded as a data URI), a
name ending in .zip a folder of files plus report.html. The report must hold the QC pictures and
tables, both loss curves, the metrics, the ablation tables and chart, each with its caption from
workflow/report/*.rst.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from helpers import REPO, snakemake

pytestmark = pytest.mark.slow
SHARDS = 3
# (path of the result, first words of its caption's .rst)
EXPECTED = {
    "results/experiments/full/metrics.json": ("metrics.rst", "All metrics of experiment full"),
    "results/tables/ablation.csv": ("ablation.rst", "Table-1-shaped comparison"),
    "results/tables/ablation.md": ("ablation.rst", "Table-1-shaped comparison"),
    "results/tables/ablation.png": ("ablation.rst", "Table-1-shaped comparison"),
    "results/tables/ca_per_class.csv": ("ca_per_class.rst", "Clinical accuracy per CT-RATE"),
    "results/tables/ca_per_class.md": ("ca_per_class.rst", "Clinical accuracy per CT-RATE"),
    "results/experiments/full/scores.parquet": ("scores.rst", "Per-volume scores of experiment full"),
    "results/experiments/full/samples.html": ("samples.rst", "Generated reports of experiment full"),
    "results/tables/ca_per_class_chart.png": ("ca_per_class_chart.rst", "Clinical F1 per CT-RATE class"),
    "results/experiments/full/stage1/loss.png": ("loss.rst", "Training and validation loss of experiment full"),
    "results/experiments/full/stage2/loss.png": ("loss.rst", "Training and validation loss of experiment full"),
    **{f"results/qc/regions/shard-{k}.parquet": ("regions.rst", "Per-volume QC of the regions stage")
       for k in range(SHARDS)},
}


@pytest.fixture(scope="module")
def workdir(demo_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    wd = tmp_path_factory.mktemp("report") / "wd"
    shutil.copytree(demo_run, wd, symlinks=True)
    return wd


def script_json(html: str, var: str):
    m = re.search(rf"var {var} = (\{{.*?\}});\s*</script>", html, re.S)
    assert m, f"no `var {var}` in the report"
    return json.loads(m.group(1))


def test_html_report_holds_every_result_with_its_caption(workdir: Path) -> None:
    snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text(encoding="utf-8")
    results = script_json(html, "results")
    categories = script_json(html, "categories")

    pictures = [p for p in results if re.fullmatch(r"results/qc/regions/shard-\d/[\w.-]+\.png", p)]
    assert len(pictures) == SHARDS  # regions.qc_pictures: 1 per shard
    assert set(EXPECTED) | set(pictures) == set(results)
    for path, (rst, words) in EXPECTED.items():
        assert words in results[path]["caption"], (path, results[path]["caption"][:200])
        assert (REPO / "workflow" / "report" / rst).read_text(encoding="utf-8").replace(
            "{{ snakemake.wildcards.exp }}", "full").startswith(words)
    for path in pictures:
        assert "Region overlays of a sampled volume" in results[path]["caption"]
    # pictures are embedded, not linked: PNG bytes in data URIs
    for path in [*pictures, "results/tables/ablation.png", "results/experiments/full/stage1/loss.png",
                 "results/experiments/full/stage2/loss.png", "results/tables/ca_per_class_chart.png"]:
        assert results[path]["mime_type"] == "image/png"
        data = base64.b64decode(results[path]["data_uri"].split("base64,", 1)[1])
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    metrics = json.loads(base64.b64decode(results["results/experiments/full/metrics.json"]["data_uri"]
                                          .split("base64,", 1)[1]))
    assert metrics == json.loads((workdir / "results/experiments/full/metrics.json").read_text(encoding="utf-8"))
    assert results["results/experiments/full/stage2/loss.png"]["labels"] == {"experiment": "full", "stage": "2"}
    # generated reports to read: the sample page of each experiment, embedded, with its sample sections
    samples = base64.b64decode(results["results/experiments/full/samples.html"]["data_uri"].split("base64,", 1)[1])
    assert samples.decode("utf-8").count('<section class="sample"') >= 3  # best, median, worst at least
    assert results["results/experiments/full/samples.html"]["labels"] == {"experiment": "full"}

    assert set(categories) == {"Results", "Training", "QC"}
    assert set(categories["Results"]) == {"metrics.json per experiment", "Ablation table",
                                          "Clinical accuracy per class", "Per-volume scores", "Generated reports"}
    assert sorted(categories["Training"]["Loss curves"]) == ["results/experiments/full/stage1/loss.png",
                                                             "results/experiments/full/stage2/loss.png"]
    assert sorted(categories["QC"]["region overlays"]) == sorted(pictures)
    # the workflow description (workflow/report/workflow.rst) and the rule graph
    assert "region-focused report generation for 3D chest CT" in html
    rules = json.dumps(script_json(html, "rules"))
    assert "train_stage2" in rules and "ablation_table" in rules


def test_zip_report_holds_the_files(workdir: Path) -> None:
    snakemake(workdir, "--report", "report.zip")
    with zipfile.ZipFile(workdir / "report.zip") as z:
        names = z.namelist()
        top = names[0].split("/")[0]
        assert f"{top}/report.html" in names
        files = [n for n in names if not n.endswith("/")]
        for path in EXPECTED:
            assert any(n.endswith("/" + path.rsplit("/", 1)[1]) for n in files), path
        pngs = [n for n in files if n.endswith(".png")]
        assert len(pngs) >= SHARDS + 3  # overlays, ablation chart, two loss curves
        assert all(z.read(n)[:4] == b"\x89PNG" for n in pngs)
