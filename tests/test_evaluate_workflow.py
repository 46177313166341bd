"""The evaluate rules of the workflow (workflow/rules/evaluate.smk) run by Snakemake on ready-made predictions:
config `evaluate:` section -> CLIs, the LLM-judge rule against a local server, Java missing -> METEOR "not run",
and `snakemake --report` carrying the ablation and per-class tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import JudgeHandler, report_frames

REPO = Path(__file__).parents[1]

SNAKEFILE = """
import json
import shlex
from pathlib import Path

from pipeline.config_check import section

RES = config["results"]
# the schema's defaults, as the real Snakefile's validate fills them (this config is only a part of one)
config["evaluate"] = section(config, "evaluate")


def repo_file(path):
    return str(path)


def as_json(obj):
    return shlex.quote(json.dumps(obj, sort_keys=True))


def skip_qc_tables(wildcards):
    return []  # no data stage ran here: nothing was skipped


include: "{rules}"


rule all:
    input:
        f"{{RES}}/tables/ablation.csv",
    default_target: True
"""


@pytest.fixture
def workdir(tmp_path: Path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pred, ref = report_frames()
    res = tmp_path / "results"
    (res / "reports").mkdir(parents=True)
    ref.to_parquet(res / "reports" / "test.parquet")
    for exp in ("full", "r2"):
        (res / "experiments" / exp).mkdir(parents=True)
        pred.assign(report="" if exp == "r2" else pred["report"]).to_parquet(res / "experiments" / exp / "predictions.parquet")
    # every judge request gets "Score: 50" (the handler keys answers by prediction text)
    JudgeHandler.answers = {p: ["Score: 50"] for p in [*pred["report"], ""]}
    config = {
        "results": "results",
        "experiments": {"full": {}, "r2": {}},
        "evaluate": {
            "java": "/nonexistent/jre/bin/java",
            "bootstrap": {"resamples": 200, "seed": 7},
            "labeler": {"backend": "rules"},
            "green": {"model": None},
            "judge": {"endpoint": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "tiny-judge",
                      "retries": 0, "max_workers": 2},
        },
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (tmp_path / "Snakefile").write_text(SNAKEFILE.format(rules=REPO / "workflow" / "rules" / "evaluate.smk"), encoding="utf-8")
    yield tmp_path
    server.shutdown()
    server.server_close()


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", "Snakefile", "--configfile", "config.yaml", "--cores", "2", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, encoding="utf-8", errors="replace", env=env,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_evaluate_rules_config_judge_and_report(workdir: Path):
    _snakemake(workdir)
    res = workdir / "results"
    m = json.loads((res / "experiments" / "full" / "metrics.json").read_text(encoding="utf-8"))
    # config -> CLI: java from the config (missing -> METEOR not run, the rest computed), judge rule ran
    meteor = m["nlg"]["report"]["METEOR"]
    assert meteor["status"] == "not run" and "/nonexistent/jre/bin/java" in meteor["reason"]
    assert m["nlg"]["report"]["BLEU-4"]["value"] > 0.5
    assert m["judge"]["value"] == 50.0 and "tiny-judge" in m["judge"]["implementation"]
    assert m["judge"]["std"] == 0.0 and m["judge"]["ci95"] == [50.0, 50.0]  # every answer "Score: 50"
    assert m["green"]["status"] == "not run" and "evaluate.green" in m["green"]["reason"]
    assert json.loads((res / "experiments" / "full" / "judge.json").read_text(encoding="utf-8"))["n_scored"] == 3
    table = pd.read_csv(res / "tables" / "ablation.csv", keep_default_na=False).set_index("experiment")
    assert table.loc["full", "METEOR jar corpus"] == "not run" and table.loc["full", "GREEN report-mean"] == "not run"
    assert float(table.loc["full", "Judge 0-100 report-mean"]) == 50.0
    assert float(table.loc["r2", "BLEU-4 corpus"]) < 0.01  # empty generated reports
    assert (res / "tables" / "ca_per_class.md").is_file()
    # per-volume scores and the paired comparison with `full` (r2 generated nothing: worse on every pair)
    scores = pd.read_parquet(res / "experiments" / "full" / "scores.parquet")
    assert len(scores) == 3 and "report/BLEU-4 evaluate" in scores and "lung/ROUGE-L evaluate" in scores
    assert m["bootstrap"] == {"n_resamples": 200, "seed": 7}
    assert m["nlg"]["report"]["BLEU-4 evaluate"]["ci95"] is not None
    assert float(table.loc["r2", "vs full: BLEU-4 difference"]) < 0
    assert table.loc["full", "vs full: BLEU-4 difference"] == ""  # the baseline has no comparison with itself

    _snakemake(workdir, "--report", "report.html")
    html = (workdir / "report.html").read_text(encoding="utf-8", errors="replace")
    for name in ("ablation.csv", "ablation.png", "ablation.md", "ca_per_class.csv", "metrics.json", "scores.parquet"):
        assert name in html, name
