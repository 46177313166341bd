"""Table-1-shaped ablation table and the per-class CA table from several metrics.json files.

    python -m pipeline.evaluate.table --metrics a.json b.json ... --out-dir results/tables \
        [--scores a/scores.parquet b/scores.parquet ... --baseline full --bootstrap-resamples 1000 --seed 0]

Writes (each atomically, through pipeline.io.atomic_output):
  * ``ablation.csv`` / ``ablation.md``: rows = experiments in the order given; columns = the paper's
    Table 1 (BLEU-4, ROUGE-L, METEOR, CA-F1, GREEN, LLM judge), each named with its averaging, METEOR and
    BLEU-4 in both variants because papers mix them. The markdown ends with the implementation behind
    every column. An adapter that did not run is written ``not run`` (never 0); a score that ran but has
    no value (e.g. no parsable answer) is ``n/a``.
    Each score is printed "mean +- std [95 % CI]" in the markdown (std over reports for per-report
    metrics; corpus metrics have no std) and the CSV has ``<column> std`` / ``ci95 low`` / ``ci95 high``
    columns (:mod:`pipeline.evaluate.bootstrap`).
  * Paired comparison with the baseline experiment (``--baseline``, default ``full``) when ``--scores``
    gives each experiment's scores.parquet: for BLEU-4, METEOR and ROUGE-L (the ``evaluate`` variants;
    METEOR-NLTK when WordNet did not run) and macro CA-F1, the difference experiment - baseline on the
    volumes both scored, its 95 % paired-bootstrap CI and two-sided p (CSV columns ``vs <baseline>:
    <metric> difference / ci95 low / ci95 high / p``; a second markdown table).
  * ``ablation.png``: grouped bar chart with 95 % CI error bars (the judge's 0-100 scale divided by 100,
    CIDEr-D's 0-10 by 10); columns that did not run are labelled "not run" instead of drawn as 0.
  * ``ca_per_class.csv`` (long: experiment, class, precision, recall, f1, support, predicted, plus the
    macro / micro / weighted rows) and ``ca_per_class.md`` (F1 per class and experiment, with support).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.constants import CTRATE_CLASSES
from pipeline.evaluate import bootstrap
from pipeline.evaluate.degenerate import MARKER, is_marked, table_columns, table_note
from pipeline.evaluate.run import BootstrapSettings
from pipeline.io import atomic_output
from pipeline.stage_config import settings_from_cli

NOT_RUN = "not run"
NA = "n/a"

# column -> (where in metrics.json, key)
_SPEC: dict[str, tuple[str, str]] = {
    "BLEU-4 corpus": ("nlg", "BLEU-4"),
    "BLEU-4 report-mean": ("nlg", "BLEU-4 report-mean"),
    "BLEU-4 evaluate": ("nlg", "BLEU-4 evaluate"),
    "ROUGE-L report-mean": ("nlg", "ROUGE-L"),
    "ROUGE-L evaluate": ("nlg", "ROUGE-L evaluate"),
    "METEOR jar corpus": ("nlg", "METEOR"),
    "METEOR-NLTK report-mean": ("nlg", "METEOR-NLTK report-mean"),
    "METEOR evaluate": ("nlg", "METEOR evaluate"),
    "CIDEr-D": ("nlg", "CIDEr-D"),
    "CA-F1 macro": ("clinical", "macro_f1"),
    "GREEN report-mean": ("green", "value"),
    "Judge 0-100 report-mean": ("judge", "value"),
}
COLUMNS: tuple[str, ...] = tuple(_SPEC)
UNCERTAINTY = ("std", "ci95 low", "ci95 high")
SCALE = {"Judge 0-100 report-mean": 100.0, "CIDEr-D": 10.0}  # the chart's divisor of 0-100 / 0-10 scores
# paired comparison: metric -> scores.parquet column(s) in order of preference, or the CA-F1 label columns
PAIRED: dict[str, tuple[str, ...]] = {
    "BLEU-4": ("report/BLEU-4 evaluate",),
    "METEOR": ("report/METEOR evaluate", "report/METEOR-NLTK report-mean"),
    "ROUGE-L": ("report/ROUGE-L evaluate",),
    "CA-F1 macro": (),
}


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)``, then rename the temporary onto ``path`` (pipeline.io.atomic_output)."""
    with atomic_output(path) as tmp:
        write(str(tmp))


def _cell(entry: dict | None, key: str = "value"):
    """(table cell, implementation) of one metric entry."""
    if not entry:
        return NOT_RUN, None
    if entry.get("status") == NOT_RUN:
        return NOT_RUN, entry.get("implementation")
    value = entry.get(key)
    return (NA if value is None else float(value)), entry.get("implementation")


def _spread(entry: dict | None, key: str = "value") -> tuple:
    """(std, ci95 low, ci95 high) of one entry (None where absent)."""
    if not entry or entry.get("status") == NOT_RUN:
        return None, None, None
    ci = entry.get("ci95") if key == "value" else entry.get(f"{key}_ci95")
    std = entry.get("std") if key == "value" else None
    return std, (ci[0] if ci else None), (ci[1] if ci else None)


def row_from_metrics(m: dict) -> tuple[dict, dict]:
    """One table row and the implementation behind each of its columns."""
    row: dict = {"experiment": m["experiment"], "n_volumes": m["n_volumes"]}
    impl: dict[str, str] = {}
    for col, (where, key) in _SPEC.items():
        spread: tuple = (None, None, None)
        if where == "nlg":
            cell, imp = _cell(m["nlg"]["report"].get(key))
            spread = _spread(m["nlg"]["report"].get(key))
        elif where == "clinical":
            block = m["clinical"]["labeler_vs_labeler"]
            cell, imp = _cell(block, key)
            spread = _spread(block, key)
            imp = block.get("implementation", m.get("implementations", {}).get("CA-F1"))
        else:
            block = m.get(where)
            cell, imp = _cell(block)
            spread = _spread(block)
            if block and block.get("averaging") and imp:
                imp = f"{imp} ({block['averaging']})"
        row[col] = cell
        for name, v in zip(UNCERTAINTY, spread):
            row[f"{col} {name}"] = v
        if imp:
            impl[col] = imp
    row.update(table_columns(m))  # degenerate fraction, and the mark of a mostly degenerate experiment
    return row, impl


def build_table(metrics: list[Path] | list[dict]) -> tuple[pd.DataFrame, dict[str, str], list[dict]]:
    rows, impls, loaded = [], {}, []
    for p in metrics:
        if isinstance(p, dict):
            m = p
        else:
            with open(p, encoding="utf-8") as f:
                m = json.load(f)
        loaded.append(m)
        row, impl = row_from_metrics(m)
        rows.append(row)
        for k, v in impl.items():
            if impls.setdefault(k, v) != v:
                raise ValueError(f"{row['experiment']}: {k} implementation differs from earlier files ({v!r} vs {impls[k]!r})")
    names = [r["experiment"] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate experiment names: {dup}")
    spread = [f"{c} {u}" for c in COLUMNS for u in UNCERTAINTY]
    columns = ["experiment", "n_volumes", *COLUMNS, *spread, "degenerate fraction", MARKER]
    return pd.DataFrame(rows, columns=columns), impls, loaded


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or pd.isna(x):
        return NA
    return f"{x:.{digits}f}"


def _cell_text(r: pd.Series, col: str) -> str:
    """"0.123 +- 0.045 [0.110, 0.135]": value, std (per-report metrics), 95 % bootstrap CI."""
    digits = 1 if col.startswith("Judge") else 3
    text = _fmt(r[col], digits)
    if isinstance(r[col], str) or r[col] is None or pd.isna(r[col]):
        return text
    std, lo, hi = (r.get(f"{col} {u}") for u in UNCERTAINTY)
    if std is not None and not pd.isna(std):
        text += f" ± {std:.{digits}f}"
    if lo is not None and not pd.isna(lo):
        text += f" [{lo:.{digits}f}, {hi:.{digits}f}]"
    return text


def _markdown(df: pd.DataFrame, impls: dict[str, str], paired: pd.DataFrame | None = None,
              baseline: str | None = None, paired_note: str | None = None) -> str:
    head = "| experiment | n | " + " | ".join(COLUMNS) + " |"
    sep = "|---|---:|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for _, r in df.iterrows():
        cells = [_cell_text(r, c) for c in COLUMNS]
        mark = f" (*{MARKER}*)" if is_marked(r.get(MARKER)) else ""
        lines.append(f"| {r['experiment']}{mark} | {int(r['n_volumes'])} | " + " | ".join(cells) + " |")
    note = table_note(df)
    lines += (["", note] if note else [])
    lines += ["", "Cells: value ± std over reports (per-report metrics) [95 % bootstrap CI over volumes]."]
    if paired is not None and len(paired):
        lines += ["", f"Paired bootstrap against `{baseline}` (difference = experiment - {baseline} on the volumes "
                  "both scored; 95 % CI; two-sided p):", "",
                  "| experiment | n paired | " + " | ".join(PAIRED) + " |", "|---|---:|" + "---:|" * len(PAIRED)]
        for _, r in paired.iterrows():
            cells = []
            for metric in PAIRED:
                d = r.get(f"vs {baseline}: {metric} difference")
                if d is None or pd.isna(d):
                    cells.append(NA)
                    continue
                lo, hi, pv = (r.get(f"vs {baseline}: {metric} {k}") for k in ("ci95 low", "ci95 high", "p"))
                cells.append(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}] p={pv:.3g}")
            lines.append(f"| {r['experiment']} | {int(r[f'vs {baseline}: n volumes'])} | " + " | ".join(cells) + " |")
        if paired_note:
            lines += ["", paired_note]
    elif paired_note:
        lines += ["", paired_note]
    lines += ["", "Implementations (corpus = statistics pooled over all reports; report-mean = mean of per-report scores):", ""]
    for col in COLUMNS:
        lines.append(f"- **{col}**: {impls.get(col, NOT_RUN + ' in every experiment')}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- paired
def _paired_column(a: pd.DataFrame, b: pd.DataFrame, choices: tuple[str, ...]) -> str | None:
    """The first scores.parquet column both experiments have a value in for every shared volume."""
    for col in choices:
        if col in a and col in b and a[col].notna().all() and b[col].notna().all():
            return col
    return None


def paired_table(scores: dict[str, pd.DataFrame], baseline: str, n_resamples: int = bootstrap.DEFAULT_RESAMPLES,
                 seed: int = bootstrap.DEFAULT_SEED) -> pd.DataFrame:
    """One row per experiment other than ``baseline``: ``vs <baseline>: <metric> difference / ci95 low /
    ci95 high / p / column`` for each metric of ``PAIRED`` and ``vs <baseline>: n volumes``."""
    base = scores[baseline].set_index("volume_id")
    rows = []
    for exp, frame in scores.items():
        if exp == baseline:
            continue
        other = frame.set_index("volume_id")
        shared = sorted(set(base.index) & set(other.index))
        a, b = base.loc[shared], other.loc[shared]
        row: dict = {"experiment": exp, f"vs {baseline}: n volumes": len(shared)}
        for metric, choices in PAIRED.items():
            prefix = f"vs {baseline}: {metric}"
            if not shared:
                continue
            if metric == "CA-F1 macro":
                ref_cols = [f"reference label/{c}" for c in CTRATE_CLASSES]
                pred_cols = [f"prediction label/{c}" for c in CTRATE_CLASSES]
                if not all(c in a and c in b for c in ref_cols + pred_cols):
                    continue
                stat_a = bootstrap.macro_f1_stat(a[ref_cols].to_numpy(), a[pred_cols].to_numpy())
                stat_b = bootstrap.macro_f1_stat(b[ref_cols].to_numpy(), b[pred_cols].to_numpy())
                column = "labels"
            else:
                column = _paired_column(a, b, choices)
                if column is None:
                    continue
                stat_a, stat_b = bootstrap.mean_stat(a[column]), bootstrap.mean_stat(b[column])
            res = bootstrap.paired_difference(stat_a, stat_b, len(shared), n_resamples, seed)
            ci = res["ci95"] or [None, None]
            row.update({f"{prefix} difference": res["difference"], f"{prefix} ci95 low": ci[0],
                        f"{prefix} ci95 high": ci[1], f"{prefix} p": res["p_value"], f"{prefix} column": column})
        rows.append(row)
    return pd.DataFrame(rows)


def _plot(df: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{c}/{int(SCALE[c])}" if c in SCALE else c for c in COLUMNS]
    labels = [lab.replace("Judge 0-100 report-mean/100", "Judge/100") for lab in labels]
    n_exp = len(df)
    x = np.arange(len(COLUMNS))
    width = 0.8 / max(n_exp, 1)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(COLUMNS) + 0.4 * n_exp), 4.5))
    from matplotlib.patches import Patch

    handles = []
    for i, (_, r) in enumerate(df.iterrows()):
        xs = x - 0.4 + width * (i + 0.5)
        color = f"C{i % 10}"
        handles.append(Patch(color=color, label=str(r["experiment"])))
        for j, c in enumerate(COLUMNS):
            v = r[c]
            if isinstance(v, str) or v is None or pd.isna(v):
                ax.text(xs[j], 0.01, v if isinstance(v, str) else NA, rotation=90, ha="center", va="bottom",
                        fontsize=7, color="0.4")
                continue
            scale = SCALE.get(c, 1.0)
            lo, hi = r.get(f"{c} ci95 low"), r.get(f"{c} ci95 high")
            yerr = None
            if lo is not None and hi is not None and not pd.isna(lo) and not pd.isna(hi):
                # percentile CIs need not be centred on the value: asymmetric bars, never below 0
                yerr = [[max(float(v) - float(lo), 0) / scale], [max(float(hi) - float(v), 0) / scale]]
            ax.bar(xs[j], float(v) / scale, width, color=color, yerr=yerr, capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score (bars: 95 % bootstrap CI)")
    ax.set_ylim(0, 1)
    ax.set_title("Ablation (merged report vs findings)")
    ax.legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def per_class_table(metrics: list[dict]) -> pd.DataFrame:
    rows = []
    for m in metrics:
        block = m["clinical"]["labeler_vs_labeler"]
        for cls in CTRATE_CLASSES:
            pc = block["per_class"][cls]
            rows.append({"experiment": m["experiment"], "class": cls,
                         **{k: pc[k] for k in ("precision", "recall", "f1", "support", "predicted")}})
        for avg in ("macro", "micro", "weighted"):
            rows.append({"experiment": m["experiment"], "class": f"{avg} average", "precision": None, "recall": None,
                         "f1": block[f"{avg}_f1"], "support": None, "predicted": None})
    return pd.DataFrame(rows, columns=["experiment", "class", "precision", "recall", "f1", "support", "predicted"])


def _per_class_markdown(long: pd.DataFrame, metrics: list[dict]) -> str:
    exps = [m["experiment"] for m in metrics]
    impl = metrics[0]["clinical"]["labeler_vs_labeler"].get("implementation", "") if metrics else ""
    lines = ["| class | support (" + exps[0] + ") | " + " | ".join(f"F1 {e}" for e in exps) + " |",
             "|---|---:|" + "---:|" * len(exps)]
    for cls in [*CTRATE_CLASSES, "macro average", "micro average", "weighted average"]:
        sub = long[long["class"] == cls].set_index("experiment")
        support = sub.loc[exps[0], "support"]
        cells = [_fmt(sub.loc[e, "f1"]) for e in exps]
        sup = "" if support is None or pd.isna(support) else str(int(support))
        lines.append(f"| {cls} | {sup} | " + " | ".join(cells) + " |")
    lines += ["", f"Per-class clinical F1 (labeler on reference and generated report). {impl}.",
              "n/a = no positive reference report for the class (F1 undefined, left out of the macro average)."]
    return "\n".join(lines) + "\n"


def write_tables(df: pd.DataFrame, impls: dict[str, str], out_dir: Path, metrics: list[dict] | None = None,
                 scores: dict[str, pd.DataFrame] | None = None, baseline: str = "full",
                 n_resamples: int = bootstrap.DEFAULT_RESAMPLES, seed: int = bootstrap.DEFAULT_SEED) -> list[Path]:
    """Write the tables; with ``scores`` ({experiment: scores.parquet frame}) the paired comparison with
    ``baseline`` is added to ablation.csv (columns) and ablation.md (a second table)."""
    out_dir = Path(out_dir)
    paired, note = None, None
    if scores:
        if baseline in scores:
            paired = paired_table(scores, baseline, n_resamples, seed)
            if len(paired):
                df = df.merge(paired[[c for c in paired.columns if not c.endswith(" column")]], on="experiment", how="left")
                columns = {c: paired[c].dropna().iloc[0] for c in paired.columns
                           if c.endswith(" column") and paired[c].notna().any()}
                note = "Paired scores: " + "; ".join(f"{k.split(': ')[1][:-7]} = {v}" for k, v in columns.items()) + (
                    f". {bootstrap.description(n_resamples, seed)}.")
        else:
            note = f"No paired comparison: the baseline experiment {baseline!r} is not among {sorted(scores)}."
    csv, md, png = out_dir / "ablation.csv", out_dir / "ablation.md", out_dir / "ablation.png"
    _atomic(csv, lambda t: df.to_csv(t, index=False))
    _atomic(md, lambda t: Path(t).write_text(_markdown(df, impls, paired, baseline, note), encoding="utf-8"))
    _atomic(png, lambda t: _plot(df, t))
    paths = [csv, md, png]
    if metrics:
        long = per_class_table(metrics)
        pcsv, pmd = out_dir / "ca_per_class.csv", out_dir / "ca_per_class.md"
        _atomic(pcsv, lambda t: long.to_csv(t, index=False))
        _atomic(pmd, lambda t: Path(t).write_text(_per_class_markdown(long, metrics), encoding="utf-8"))
        paths += [pcsv, pmd]
    return paths


@dataclass(frozen=True)
class AblationTableSettings:
    """The ablation table's settings: `evaluate.baseline` (the experiment the others are compared with,
    by a paired bootstrap) and `evaluate.bootstrap` (its resamples and seed)."""

    baseline: str = "full"
    bootstrap: BootstrapSettings = field(default_factory=BootstrapSettings)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", nargs="+", required=True, type=Path,
                    help="each experiment's metrics.json (python -m pipeline.evaluate), one table row each, in this order")
    ap.add_argument("--out-dir", required=True, type=Path,
                    help="folder for ablation.csv/.md/.png and ca_per_class.csv/.md")
    ap.add_argument("--scores", nargs="*", default=[], type=Path,
                    help="each experiment's scores.parquet, in the order of --metrics (paired comparison)")
    ap.add_argument("--params-json", default="{}",
                    help='AblationTableSettings as JSON, e.g. \'{"baseline": "full", "bootstrap": {"resamples": 1000, '
                         '"seed": 0}}\' (default: {})')
    args = ap.parse_args(argv)
    settings = settings_from_cli(ap, AblationTableSettings, args.params_json, section="evaluate")
    if args.scores and len(args.scores) != len(args.metrics):
        print(f"error: {len(args.scores)} --scores files for {len(args.metrics)} --metrics files", file=sys.stderr)
        return 2
    df, impls, loaded = build_table(args.metrics)
    scores = {m["experiment"]: pd.read_parquet(p) for m, p in zip(loaded, args.scores)} if args.scores else None
    paths = write_tables(df, impls, args.out_dir, loaded, scores, settings.baseline, settings.bootstrap.resamples,
                         settings.bootstrap.seed)
    print(Path(paths[1]).read_text(encoding="utf-8"), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
