"""The demo's "it learns" claim (docs/demo-learning.md): the full model, trained by the workflow, writes
the planted findings of test volumes it never saw. CA-F1 (macro over the planted classes with test
support) >= 0.6 and >= 0.3 above a most-common-report baseline, and >= 90 % of the test pairs with
different findings get different reports.

The default demo (80 volumes) cannot reach this: simple learners on its own inputs reach 0.458
(`benchmarks/demo_learning.py --ceiling`). The claim is for the 5-finding demo cohort at 300 volumes
(207 training volumes) with the 4-layer demo LM initialised at std 0.08 (`demo_llm_init_0.08.yaml`:
at LLaMA's 0.02 the 256-wide LM's attention stays near uniform). Its model stages alone take ~86 min
on 2 cores: more than CI's budget. So the test is opt-in. Measured (docs/demo-learning.md, "Does the demo model
learn?"): 0.645 / 0.648 / 0.784 for model seeds 0 / 1 / 2, all three passing; at init std 0.02 the
same seeds scored 0.563 / 0.691 / 0.595, one of three passing.

    MEDREGION_RUN_LEARNING=1 python -m pytest -s tests/test_demo_learns.py      # runs the workflow
    MEDREGION_RUN_LEARNING=1 MEDREGION_LEARNING_SEEDS="0 1 2" python -m pytest -s tests/test_demo_learns.py
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

COHORT_OVERLAY = "benchmarks/configs/demo_5_findings_300.yaml"
INIT_OVERLAY = "benchmarks/configs/demo_llm_init_0.08.yaml"
OVERLAYS = ["config/config.yaml", "benchmarks/configs/feature_norm.yaml",
            "benchmarks/configs/demo_llm_4x256.yaml", COHORT_OVERLAY, INIT_OVERLAY]
# model seed -> the overlay that sets the demo LM's, stage 1's and stage 2's seeds (0: the config's own)
SEED_OVERLAYS = {0: [], **{int(p.stem.rsplit("_", 1)[1]): [str(p.relative_to(REPO))]
                           for p in (REPO / "benchmarks" / "configs").glob("model_seed_*.yaml")}}
RESULTS = os.environ.get("MEDREGION_LEARNING_RESULTS")
RUN = os.environ.get("MEDREGION_RUN_LEARNING")


def requested_seeds(text: str) -> set[int]:
    """MEDREGION_LEARNING_SEEDS ("0 1 2" or "0,2"): a seed without an overlay is an error, not a silent skip."""
    words = text.replace(",", " ").split()
    bad = [w for w in words if not w.isdigit() or int(w) not in SEED_OVERLAYS]
    if bad:
        raise pytest.UsageError(f"MEDREGION_LEARNING_SEEDS={text!r}: {bad} not among the model seeds with an "
                                f"overlay {sorted(SEED_OVERLAYS)}")
    return {int(w) for w in words}


SEEDS = requested_seeds(os.environ.get("MEDREGION_LEARNING_SEEDS", "0"))

pytestmark = pytest.mark.slow


def assert_the_claim(results: Path) -> None:
    # the claim is about this configuration: a run whose overlays were not applied must not pass
    llm = json.loads((results / "demo" / "models" / "llm" / "config.json").read_text(encoding="utf-8"))
    assert (llm["hidden_size"], llm["num_hidden_layers"]) == (256, 4)
    init = yaml.safe_load((REPO / INIT_OVERLAY).read_text(encoding="utf-8"))["llm"]["demo_init_std"]
    assert llm["initializer_range"] == pytest.approx(init), "the demo LM was not built with the claim's init std"
    res = dl.score(results, "full")
    cohort = yaml.safe_load((REPO / COHORT_OVERLAY).read_text(encoding="utf-8"))
    assert set(res["classes_scored"]) == set(cohort["dataset"]["demo"]["findings"])
    # ~16 % of the cohort is test split: a smaller cohort than the overlay names fails here
    assert res["test_volumes"] >= 0.15 * cohort["dataset"]["demo"]["n_cases"]
    print(json.dumps({k: res[k] for k in ("ca_f1_macro_planted", "baseline_ca_f1_macro_planted", "gain",
                                          "share_of_those_pairs_with_different_reports")}))
    assert res["ca_f1_macro_planted"] >= dl.MIN_F1
    assert res["gain"] >= dl.MIN_GAIN
    assert res["share_of_those_pairs_with_different_reports"] >= dl.MIN_DIFFER
    assert res["claim_met"]


@pytest.mark.skipif(not RESULTS, reason="set MEDREGION_LEARNING_RESULTS=<run>/results to score a finished run")
def test_a_finished_run_writes_the_planted_findings_of_unseen_volumes():
    assert_the_claim(Path(RESULTS))


@pytest.mark.parametrize("seed", sorted(SEED_OVERLAYS))
def test_the_full_model_writes_the_planted_findings_of_unseen_volumes(tmp_path, seed):
    if not RUN:
        pytest.skip("~1.5-2 h per run on 2 cores: set MEDREGION_RUN_LEARNING=1 (MEDREGION_LEARNING_SEEDS picks "
                    "the model seeds, default 0)")
    if seed not in SEEDS:
        pytest.skip(f"model seed {seed} not in MEDREGION_LEARNING_SEEDS")
    files = [str(REPO / f) for f in OVERLAYS + SEED_OVERLAYS[seed]]
    dl.run_demo(tmp_path, files, cores=max(1, min(os.cpu_count() or 1, 8)))
    assert_the_claim(tmp_path / "results")
