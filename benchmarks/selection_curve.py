"""Does the validation clinical F1 choose well? Each kept stage-2 checkpoint of a finished demo run, scored
on the test split, next to the validation clinical F1 the trainer logged at the same step.

    python benchmarks/selection_curve.py --results DIR/results [--experiment full] [--every K] [--min-epoch E]
        [--average-from EPOCH ...] [--json F] [--png F]

The run must have trained stage 2 with `select_by: val_ca_f1` and kept a checkpoint at the scored steps
(`benchmarks/configs/select_val_ca_f1.yaml`: both every 2 epochs, all checkpoints kept). Each checkpoint's
trainable weights are put into the finished model (from_pretrained, so the frozen LM, the tokenizer and
the fitted feature statistics are the run's) and saved to a temporary folder; `model.generate` writes
its test reports as the generate rule does, and they are scored as `benchmarks/demo_learning.py` scores
(macro F1 over the planted classes with test support). Printed side by side per scored epoch:
validation loss, validation clinical F1 (what selection sees), test CA-F1 (what it should predict);
then the epoch selection chose against the last epoch and the best epoch in hindsight, and the rank
correlation of the two F1 curves. `--average-from E` also scores checkpoint averaging: the element-wise
mean of the weights of every scored checkpoint from epoch E on, put into the model the same way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from demo_learning import PLANTED, _generated_scores, macro_over, model_inputs  # noqa: E402


def checkpoint_model(model_dir: Path, checkpoints: list[Path], out: Path) -> None:
    """The finished model with the trainable weights of `checkpoints` (Accelerate's model.safetensors):
    one checkpoint's as they are, several averaged element-wise (in float64, stored in the model's dtype)."""
    import torch
    from safetensors.torch import load_file

    from model.network import MedRegionCT

    model = MedRegionCT.from_pretrained(model_dir)
    own = model.state_dict()
    total: dict[str, torch.Tensor] = {}
    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "model.safetensors"))
        unknown = sorted(set(weights) - set(own))
        if unknown:
            raise SystemExit(f"{checkpoint}: tensors the network does not have: {unknown[:5]}")
        if total and set(weights) != set(total):
            raise SystemExit(f"{checkpoint}: other tensors than {checkpoints[0]}")
        for k, v in weights.items():
            total[k] = total[k] + v.double() if k in total else v.double()
    with torch.no_grad():
        model.load_state_dict({k: (v / len(checkpoints)).to(own[k].dtype) for k, v in total.items()}, strict=False)
    model.save_pretrained(out)


def spearman(a: list[float], b: list[float]) -> float | None:
    if len(a) < 3:
        return None
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def _test_scores(model_dir: Path, checkpoints: list[Path], feats: list[str], attrs: list[str],
                 test: Path) -> tuple[float, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint_model(model_dir, checkpoints, Path(tmp))
        scores, _ = _generated_scores(Path(tmp), feats, attrs, test)
    f1, used = macro_over(scores, PLANTED)
    return f1, {c: round(scores["per_class"][c]["f1"], 2) for c in used}


def curve(results: Path, experiment: str = "full", every: int = 1, min_epoch: float = 0,
          average_from: tuple[float, ...] = ()) -> dict:
    model_dir = results / "experiments" / experiment / "stage2"
    log = [json.loads(x) for x in (model_dir / "train_log.jsonl").read_text(encoding="utf-8").splitlines() if x]
    scored = {r["step"]: r for r in log if r.get("val_ca_f1") is not None and "event" not in r}
    chosen = next((r for r in log if r.get("event") == "selected"), None)
    if not scored or chosen is None:
        raise SystemExit(f"{model_dir}: no validation clinical F1 in train_log.jsonl (train with select_by val_ca_f1)")
    ckpts = {int(c.name[5:]): c for c in (model_dir / "checkpoints").glob("step-*") if c.name[5:].isdigit()}
    kept = sorted(set(scored) & set(ckpts))
    steps = [s for s in kept if scored[s]["epoch"] >= min_epoch]
    if not steps:
        raise SystemExit(f"{model_dir}/checkpoints: no checkpoint at a scored step ({sorted(scored)[:5]}...)")
    # every k-th scored checkpoint, and always the selected and the last one
    steps = sorted({s for i, s in enumerate(steps) if i % every == every - 1} | {steps[-1]}
                   | ({chosen["step"]} & set(steps)))
    feats, attrs = model_inputs(results, "r2")
    test = results / "reports" / "test.parquet"
    rows = []
    for step in steps:
        f1, per_class = _test_scores(model_dir, [ckpts[step]], feats, attrs, test)
        r = scored[step]
        rows.append({"epoch": r["epoch"], "step": step, "val_loss": round(r["val_loss"], 4),
                     "val_ca_f1": round(r["val_ca_f1"], 3), "test_ca_f1": round(f1, 3), "test_per_class": per_class})
        print(f"epoch {r['epoch']:>3}: val loss {r['val_loss']:.4f}  val F1 {r['val_ca_f1']:.3f}  "
              f"test CA-F1 {f1:.3f}", flush=True)
    averages = []
    for start in average_from:  # the mean of the weights of every scored checkpoint from that epoch on
        tail = [s for s in kept if scored[s]["epoch"] >= start]
        if not tail:
            raise SystemExit(f"{model_dir}/checkpoints: no scored checkpoint from epoch {start} on")
        f1, per_class = _test_scores(model_dir, [ckpts[s] for s in tail], feats, attrs, test)
        averages.append({"from_epoch": start, "checkpoints": len(tail), "steps": tail, "test_ca_f1": round(f1, 3),
                         "test_per_class": per_class})
        print(f"mean of the {len(tail)} checkpoints from epoch {start}: test CA-F1 {f1:.3f}", flush=True)
    by_step = {r["step"]: r for r in rows}
    last = rows[-1]
    hindsight = max(rows, key=lambda r: r["test_ca_f1"])
    return {
        "results": str(results),
        "rows": rows,
        "selected": by_step.get(chosen["step"]),
        "last": last,
        "best_in_hindsight": hindsight,
        "spearman_val_f1_vs_test_f1": spearman([r["val_ca_f1"] for r in rows], [r["test_ca_f1"] for r in rows]),
        "spearman_val_loss_vs_test_f1": spearman([-r["val_loss"] for r in rows], [r["test_ca_f1"] for r in rows]),
        "weight_averages": averages,
    }


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    ep = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(ep, [r["val_ca_f1"] for r in rows], "s-", label="validation clinical F1 (selection)")
    ax.plot(ep, [r["test_ca_f1"] for r in rows], "o-", label="test CA-F1 (planted classes)")
    if res["selected"]:
        ax.axvline(res["selected"]["epoch"], color="tab:green", ls=":", label="selected epoch")
    ax.axhline(0.6, color="grey", lw=0.8, ls="--", label="claim: 0.6")
    ax.set_xlabel("epoch")
    ax.set_ylabel("macro F1")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Stage-2 checkpoints: validation vs test clinical F1")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", type=Path, required=True)
    ap.add_argument("--experiment", default="full")
    ap.add_argument("--every", type=int, default=1, help="score every k-th scored checkpoint (always the "
                    "selected and the last one)")
    ap.add_argument("--min-epoch", type=float, default=0, help="skip checkpoints of earlier epochs")
    ap.add_argument("--average-from", type=float, nargs="*", default=[], metavar="EPOCH",
                    help="also score the element-wise mean of the weights of every scored checkpoint from "
                    "each EPOCH on (checkpoint averaging)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path)
    args = ap.parse_args(argv)
    res = curve(args.results, args.experiment, args.every, args.min_epoch, tuple(args.average_from))
    s, last, best = res["selected"], res["last"], res["best_in_hindsight"]
    print(f"\nselected by validation clinical F1: epoch {s['epoch']}, test CA-F1 {s['test_ca_f1']:.3f}"
          if s else "\nselected epoch has no checkpoint")
    print(f"last epoch ({last['epoch']}): test CA-F1 {last['test_ca_f1']:.3f}; best in hindsight: epoch "
          f"{best['epoch']}, {best['test_ca_f1']:.3f}")
    print(f"rank correlation with test CA-F1 over {len(res['rows'])} checkpoints: validation F1 "
          f"{res['spearman_val_f1_vs_test_f1']}, validation loss (negated) {res['spearman_val_loss_vs_test_f1']}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.png:
        plot(res, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
