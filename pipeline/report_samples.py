"""Reports to read: a page of generated reports next to their references, per experiment, and a chart of
clinical F1 per class across experiments.

`samples` (one HTML page per experiment, in `snakemake --report`): a reproducible sample of test volumes,
always the best, the median and the worst by CA agreement (the share of the 18 CT-RATE labels on which the
labeler reads the generated report as it reads the reference), the rest drawn with `numpy.random.
default_rng(seed)`. Per volume: the reference and the generated text side by side for each of the six
regions, the per-report scores (the `report/...` columns of scores.parquet) and the 18 labels of both
with agreements and misses marked (found, missed, false positive; agreeing negatives grey). The page is
self-contained (inline CSS, no script, nothing fetched).

`chart`: per-class F1 (labeler on the reference vs labeler on the generated report, from each
experiment's scores.parquet) for every experiment side by side, with 95 % percentile-bootstrap intervals
over volumes (the resamples of `pipeline.evaluate.bootstrap`); classes without a positive reference in
the test split are left out.

CLI:
  python -m pipeline.report_samples samples --predictions P --references R --scores S --experiment E \
      --out samples.html [--params-json '{"n": 6, "seed": 0}']
  python -m pipeline.report_samples chart --scores a/scores.parquet b/scores.parquet --experiments a b \
      --out ca_per_class.png [--params-json '{"resamples": 1000, "seed": 0}']
"""

from __future__ import annotations

import argparse
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.constants import CTRATE_CLASSES, REGION_HEADERS, REGIONS
from pipeline.evaluate import bootstrap
from pipeline.evaluate.degenerate import COLUMNS as DEGENERATE_COLUMNS
from pipeline.evaluate.run import BootstrapSettings
from pipeline.io import atomic_output, setup_logging
from pipeline.stage_config import settings_from_cli

REF_LABEL, PRED_LABEL = "reference label/", "prediction label/"


def label_matrices(scores: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(volumes, 18) 0/1 label matrices of the references and the predictions, CT-RATE class order."""
    missing = [c for c in CTRATE_CLASSES if f"{REF_LABEL}{c}" not in scores or f"{PRED_LABEL}{c}" not in scores]
    if missing:
        raise ValueError(f"scores table lacks the label columns of {missing[:3]}...")
    ref = scores[[f"{REF_LABEL}{c}" for c in CTRATE_CLASSES]].to_numpy(dtype=float) > 0
    pred = scores[[f"{PRED_LABEL}{c}" for c in CTRATE_CLASSES]].to_numpy(dtype=float) > 0
    return ref, pred


def ca_agreement(scores: pd.DataFrame) -> pd.Series:
    """Per volume: the share of the 18 labels on which reference and prediction agree."""
    ref, pred = label_matrices(scores)
    return pd.Series((ref == pred).mean(axis=1), index=scores["volume_id"].astype(str))


def choose_samples(agreement: pd.Series, n: int, seed: int) -> list[tuple[str, str]]:
    """(volume_id, role): best, median and worst by agreement (ties: the smaller id), then `n - 3` drawn at
    random (seeded) from the rest; shown best first."""
    order = sorted(agreement.items(), key=lambda kv: (-kv[1], kv[0]))
    if not order:
        return []
    picks: dict[str, str] = {}
    for role, (vid, _) in (("best", order[0]), ("median", order[len(order) // 2]), ("worst", order[-1])):
        picks.setdefault(vid, role)
    rest = [vid for vid, _ in order if vid not in picks]
    extra = max(0, n - len(picks))
    if extra and rest:
        drawn = np.random.default_rng(seed).choice(len(rest), size=min(extra, len(rest)), replace=False)
        for i in sorted(drawn):
            picks[rest[i]] = "random"
    rank = {vid: i for i, (vid, _) in enumerate(order)}
    return sorted(picks.items(), key=lambda kv: rank[kv[0]])


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top}
th{background:#f4f4f4;text-align:left} td.text{width:45%;white-space:pre-wrap}
.found{background:#c8f0c8} .missed{background:#f7c6c6} .falsepos{background:#fde2b8} .neg{color:#999}
.role{font-size:.8em;padding:1px 6px;border-radius:8px;background:#e8e8ff;margin-left:.5em}
.flag{color:#b00;font-weight:bold}
"""


def _label_cell(ref: bool, pred: bool) -> tuple[str, str]:
    if ref and pred:
        return "found", "found"
    if ref:
        return "missed", "missed"
    if pred:
        return "falsepos", "false positive"
    return "neg", "-"


def sample_section(vid: str, role: str, agreement: float, ref_row: pd.Series, pred_row: pd.Series,
                   score_row: pd.Series) -> str:
    e = html.escape
    parts = [f'<section class="sample" id="sample-{e(vid)}"><h2>{e(vid)}<span class="role">{e(role)}</span>'
             f' CA agreement {agreement:.2f}</h2>']
    flags = [c for c in DEGENERATE_COLUMNS if c in pred_row and bool(pred_row[c])]
    if flags:
        parts.append('<p class="flag">degenerate output: ' + ", ".join(
            f"{c} = {pred_row[c]}" for c in flags) + "</p>")
    parts.append("<table><tr><th>region</th><th>reference</th><th>generated</th></tr>")
    for region in REGIONS:
        ref_text = str(ref_row.get(region, "") or "")
        gen_text = str(pred_row.get(region, "") or "")
        parts.append(f"<tr><th>{e(REGION_HEADERS[region])}</th><td class='text'>{e(ref_text)}</td>"
                     f"<td class='text'>{e(gen_text)}</td></tr>")
    parts.append("</table>")
    metrics = [(c.split("/", 1)[1], score_row[c]) for c in score_row.index
               if c.startswith("report/") and "pycoco BLEU" not in c and pd.notna(score_row[c])
               and isinstance(score_row[c], (int, float, np.floating, np.integer))]
    if metrics:
        parts.append("<table><tr>" + "".join(f"<th>{e(k)}</th>" for k, _ in metrics) + "</tr><tr>"
                     + "".join(f"<td>{float(v):.3f}</td>" for _, v in metrics) + "</tr></table>")
    parts.append("<table class='labels'><tr><th>class</th><th>reference</th><th>generated</th><th></th></tr>")
    for c in CTRATE_CLASSES:
        r, p = bool(score_row[f"{REF_LABEL}{c}"]), bool(score_row[f"{PRED_LABEL}{c}"])
        css, word = _label_cell(r, p)
        parts.append(f"<tr class='{css}'><td>{e(c)}</td><td>{int(r)}</td><td>{int(p)}</td><td>{word}</td></tr>")
    parts.append("</table></section>")
    return "\n".join(parts)


def samples_page(experiment: str, predictions: pd.DataFrame, references: pd.DataFrame, scores: pd.DataFrame,
                 n: int = 6, seed: int = 0) -> str:
    """The whole HTML page for one experiment."""
    scores = scores.assign(volume_id=scores["volume_id"].astype(str)).set_index("volume_id", drop=False)
    preds = predictions.assign(volume_id=predictions["volume_id"].astype(str)).set_index("volume_id")
    refs = references.assign(volume_id=references["volume_id"].astype(str)).set_index("volume_id")
    scored = [v for v in scores.index if v in preds.index and v in refs.index]
    agreement = ca_agreement(scores.loc[scored]) if scored else pd.Series(dtype=float)
    picks = choose_samples(agreement, n, seed)
    e = html.escape
    body = [f"<h1>Generated reports: experiment {e(experiment)}</h1>",
            f"<p>{len(picks)} of {len(scored)} scored test volumes: the best, the median and the worst by CA "
            f"agreement (share of the 18 labels read the same from reference and generated report), the rest "
            f"drawn at random (seed {seed}). Labels: <span class='found'>found</span>, "
            f"<span class='missed'>missed</span>, <span class='falsepos'>false positive</span>.</p>"]
    if not picks:
        body.append("<p>No scored volume.</p>")
    body.append("<ul>" + "".join(f"<li><a href='#sample-{e(v)}'>{e(v)}</a> ({e(r)})</li>" for v, r in picks) + "</ul>")
    for vid, role in picks:
        body.append(sample_section(vid, role, float(agreement[vid]), refs.loc[vid], preds.loc[vid], scores.loc[vid]))
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{e(experiment)}: generated reports</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")


def per_class_f1(scores: pd.DataFrame, n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
                 seed: int = bootstrap.DEFAULT_SEED) -> pd.DataFrame:
    """Per class: f1, ci_low, ci_high, support (reference positives); NaN F1 where support is 0."""
    ref, pred = label_matrices(scores)
    counts = bootstrap.multiplicities(len(scores), n_resamples, seed)

    def f1(weights: np.ndarray) -> np.ndarray:
        tp = weights @ (ref & pred).astype(float)
        fp = weights @ (~ref & pred).astype(float)
        fn = weights @ (ref & ~pred).astype(float)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)

    point = f1(np.ones((1, len(scores))))[0]
    samples = f1(counts)
    rows = []
    for j, c in enumerate(CTRATE_CLASSES):
        ci = bootstrap.interval(samples[:, j]) if np.isfinite(point[j]) else None
        rows.append({"class": c, "f1": point[j], "ci_low": ci[0] if ci else np.nan, "ci_high": ci[1] if ci else np.nan,
                     "support": int(ref[:, j].sum())})
    return pd.DataFrame(rows)


def chart(scores_by_experiment: dict[str, pd.DataFrame], out_png: Path, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Grouped bars of per-class F1 with 95 % CIs, one colour per experiment; returns the numbers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = {exp: per_class_f1(s, n_resamples, seed).assign(experiment=exp) for exp, s in scores_by_experiment.items()}
    data = pd.concat(tables.values(), ignore_index=True)
    classes = [c for c in CTRATE_CLASSES if (data[data["class"] == c]["support"] > 0).any()]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(classes) + 2), 4.2))
    width = 0.8 / max(1, len(tables))
    for i, (exp, t) in enumerate(tables.items()):
        t = t.set_index("class").loc[classes]
        x = np.arange(len(classes)) + (i - (len(tables) - 1) / 2) * width
        f1 = t["f1"].to_numpy(dtype=float)
        err = np.vstack([f1 - t["ci_low"].to_numpy(dtype=float), t["ci_high"].to_numpy(dtype=float) - f1])
        ax.bar(x, np.nan_to_num(f1), width, label=exp, yerr=np.nan_to_num(err), capsize=2)
    ax.set_xticks(np.arange(len(classes)))
    ax.set_xticklabels([f"{c}\n(n={int(data[(data['class'] == c)]['support'].max())})" for c in classes],
                       rotation=45, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1 (labeler on generated vs reference report)")
    ax.set_title("Clinical F1 per class, 95 % bootstrap intervals over test volumes")
    if classes:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no class has a positive reference in the test split", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    with atomic_output(out_png) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return data


@dataclass(frozen=True)
class SamplesSettings:
    """The generated-reports page's settings: the config's `report_samples` section."""

    n: int = 6
    seed: int = 0


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.report_samples", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True, help="samples | chart")
    s = sub.add_parser("samples", help="an HTML page of sampled generated reports of one experiment")
    s.add_argument("--predictions", type=Path, required=True, help="the experiment's predictions.parquet")
    s.add_argument("--references", type=Path, required=True, help="results/reports/test.parquet")
    s.add_argument("--scores", type=Path, required=True, help="the experiment's scores.parquet")
    s.add_argument("--experiment", required=True, help="experiment name (page title)")
    s.add_argument("--params-json", default="{}",
                   help='SamplesSettings as JSON (the `report_samples` section), e.g. \'{"n": 6, "seed": 0}\'')
    s.add_argument("--out", type=Path, required=True, help="the HTML page")
    c = sub.add_parser("chart", help="per-class CA-F1 of every experiment with bootstrap intervals")
    c.add_argument("--scores", type=Path, nargs="+", required=True, help="each experiment's scores.parquet")
    c.add_argument("--experiments", nargs="+", required=True, help="experiment names, in the order of --scores")
    c.add_argument("--params-json", default="{}",
                   help='BootstrapSettings as JSON (evaluate.bootstrap), e.g. \'{"resamples": 1000, "seed": 0}\'')
    c.add_argument("--out", type=Path, required=True, help="the PNG chart (a CSV of its numbers is written beside it)")
    args = ap.parse_args(argv)
    log = setup_logging()
    if args.command == "samples":
        cfg = settings_from_cli(ap, SamplesSettings, args.params_json, section="report_samples")
        page = samples_page(args.experiment, pd.read_parquet(args.predictions), pd.read_parquet(args.references),
                            pd.read_parquet(args.scores), cfg.n, cfg.seed)
        with atomic_output(args.out) as tmp:
            tmp.write_text(page, encoding="utf-8")
        log.info("%s: %s", args.experiment, args.out)
    else:
        if len(args.scores) != len(args.experiments):
            ap.error("--scores and --experiments must have the same length")
        boot = settings_from_cli(ap, BootstrapSettings, args.params_json, section="evaluate.bootstrap")
        data = chart({e: pd.read_parquet(p) for e, p in zip(args.experiments, args.scores)}, args.out,
                     boot.resamples, boot.seed)
        with atomic_output(args.out.with_suffix(".csv")) as tmp:
            data.to_csv(tmp, index=False)
        log.info("chart of %d experiments: %s", len(args.experiments), args.out)


if __name__ == "__main__":
    main()
