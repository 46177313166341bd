"""Issue 8's "it learns": the full model, trained by the workflow, writes the planted findings of test
volumes it never saw. CA-F1 (macro over the planted classes with test support) >= 0.6 and >= 0.3
above a most-common-report baseline, and >= 90 % of the test pairs with different findings get
different reports.

The default demo (80 volumes) cannot reach this: simple learners on its own inputs reach 0.458
(`benchmarks/demo_learning.py --ceiling`). The claim is for the 5-finding demo cohort at 200 volumes
with the 4-layer demo LM, whose workflow run takes ~45 min on 2 cores: more than CI's budget. So the
test is opt-in. It passes with the config's seeds (0.648); re-seeded runs fall short (0.531 and
0.547 with benchmarks/configs/model_seed_{1,2}.yaml; README, "Does the demo model learn?").

    MEDREGION_RUN_LEARNING=1 python -m pytest -s tests/test_demo_learns.py      # runs the workflow
    MEDREGION_LEARNING_RESULTS=DIR/results python -m pytest tests/test_demo_learns.py   # scores a run
"""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import demo_learning as dl  # noqa: E402

OVERLAYS = ["config/config.yaml", "benchmarks/configs/demo_5_findings_200.yaml",
            "benchmarks/configs/feature_norm.yaml", "benchmarks/configs/demo_llm_4x256.yaml"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (os.environ.get("MEDREGION_RUN_LEARNING") or os.environ.get("MEDREGION_LEARNING_RESULTS")),
        reason="~45 min on 2 cores: set MEDREGION_RUN_LEARNING=1 (or MEDREGION_LEARNING_RESULTS=<run>/results)",
    ),
]


def test_the_full_model_writes_the_planted_findings_of_unseen_volumes(tmp_path):
    given = os.environ.get("MEDREGION_LEARNING_RESULTS")
    if given:
        results = Path(given)
    else:
        dl.run_demo(tmp_path, [str(REPO / f) for f in OVERLAYS], cores=max(1, min(os.cpu_count() or 1, 8)))
        results = tmp_path / "results"
    # the claim is about this configuration: a run whose overlays were not applied must not pass
    llm = json.loads((results / "demo" / "models" / "llm" / "config.json").read_text(encoding="utf-8"))
    assert (llm["hidden_size"], llm["num_hidden_layers"]) == (256, 4)
    res = dl.score(results, "full")
    cohort = yaml.safe_load((REPO / OVERLAYS[1]).read_text(encoding="utf-8"))
    assert set(res["classes_scored"]) == set(cohort["dataset"]["demo"]["findings"])
    assert res["test_volumes"] >= 30
    print(json.dumps({k: res[k] for k in ("ca_f1_macro_planted", "baseline_ca_f1_macro_planted", "gain",
                                          "share_of_those_pairs_with_different_reports")}))
    assert res["ca_f1_macro_planted"] >= dl.MIN_F1
    assert res["gain"] >= dl.MIN_GAIN
    assert res["share_of_those_pairs_with_different_reports"] >= dl.MIN_DIFFER
    assert res["claim_met"]
