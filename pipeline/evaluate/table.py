"""Table-1-shaped ablation table and the per-class CA table from several metrics.json files.

    python -m pipeline.evaluate.table --metrics a.json b.json ... --out-dir results/tables

Writes (each atomically: temp file + os.replace):
  * ``ablation.csv`` / ``ablation.md``: rows = experiments in the order given; columns = the paper's
    Table 1 (BLEU-4, ROUGE-L, METEOR, CA-F1, GREEN, LLM judge), each named with its averaging, METEOR and
    BLEU-4 in both variants because papers mix them. The markdown ends with the implementation behind
    every column. An adapter that did not run is written ``not run`` (never 0); a score that ran but has
    no value (e.g. no parsable answer) is ``n/a``.
  * ``ablation.png``: grouped bar chart (the judge's 0-100 scale divided by 100); columns that did not
    run are labelled "not run" instead of drawn as 0.
  * ``ca_per_class.csv`` (long: experiment, class, precision, recall, f1, support, predicted, plus the
    macro / micro / weighted rows) and ``ca_per_class.md`` (F1 per class and experiment, with support).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

from pipeline.constants import CTRATE_CLASSES
from pipeline.evaluate.degenerate import MARKER, is_marked, table_columns, table_note

NOT_RUN = "not run"
NA = "n/a"

# column -> (where in metrics.json, key)
_SPEC: dict[str, tuple[str, str]] = {
    "BLEU-4 corpus": ("nlg", "BLEU-4"),
    "BLEU-4 report-mean": ("nlg", "BLEU-4 report-mean"),
    "ROUGE-L report-mean": ("nlg", "ROUGE-L"),
    "METEOR jar corpus": ("nlg", "METEOR"),
    "METEOR-NLTK report-mean": ("nlg", "METEOR-NLTK report-mean"),
    "CA-F1 macro": ("clinical", "macro_f1"),
    "GREEN report-mean": ("green", "value"),
    "Judge 0-100 report-mean": ("judge", "value"),
}
COLUMNS: tuple[str, ...] = tuple(_SPEC)


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then move the temp file onto ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _cell(entry: dict | None, key: str = "value"):
    """(table cell, implementation) of one metric entry."""
    if not entry:
        return NOT_RUN, None
    if entry.get("status") == NOT_RUN:
        return NOT_RUN, entry.get("implementation")
    value = entry.get(key)
    return (NA if value is None else float(value)), entry.get("implementation")


def row_from_metrics(m: dict) -> tuple[dict, dict]:
    """One table row and the implementation behind each of its columns."""
    row: dict = {"experiment": m["experiment"], "n_volumes": m["n_volumes"]}
    impl: dict[str, str] = {}
    for col, (where, key) in _SPEC.items():
        if where == "nlg":
            cell, imp = _cell(m["nlg"]["report"].get(key))
        elif where == "clinical":
            block = m["clinical"]["labeler_vs_labeler"]
            cell, imp = _cell(block, key)
            imp = block.get("implementation", m.get("implementations", {}).get("CA-F1"))
        else:
            block = m.get(where)
            cell, imp = _cell(block)
            if block and block.get("averaging") and imp:
                imp = f"{imp} ({block['averaging']})"
        row[col] = cell
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
    columns = ["experiment", "n_volumes", *COLUMNS, "degenerate fraction", MARKER]
    return pd.DataFrame(rows, columns=columns), impls, loaded


def _fmt(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or pd.isna(x):
        return NA
    return f"{x:.{digits}f}"


def _markdown(df: pd.DataFrame, impls: dict[str, str]) -> str:
    head = "| experiment | n | " + " | ".join(COLUMNS) + " |"
    sep = "|---|---:|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for _, r in df.iterrows():
        cells = [_fmt(r[c], 1 if c.startswith("Judge") else 3) for c in COLUMNS]
        mark = f" (*{MARKER}*)" if is_marked(r.get(MARKER)) else ""
        lines.append(f"| {r['experiment']}{mark} | {int(r['n_volumes'])} | " + " | ".join(cells) + " |")
    note = table_note(df)
    lines += (["", note] if note else []) + ["", "Implementations (corpus = statistics pooled over all reports; report-mean = mean of per-report scores):", ""]
    for col in COLUMNS:
        lines.append(f"- **{col}**: {impls.get(col, NOT_RUN + ' in every experiment')}")
    return "\n".join(lines) + "\n"


def _plot(df: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [c.replace("Judge 0-100", "Judge/100") for c in COLUMNS]
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
            ax.bar(xs[j], float(v) / (100.0 if c.startswith("Judge") else 1.0), width, color=color)
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("score")
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


def write_tables(df: pd.DataFrame, impls: dict[str, str], out_dir: Path, metrics: list[dict] | None = None) -> list[Path]:
    out_dir = Path(out_dir)
    csv, md, png = out_dir / "ablation.csv", out_dir / "ablation.md", out_dir / "ablation.png"
    _atomic(csv, lambda t: df.to_csv(t, index=False))
    _atomic(md, lambda t: Path(t).write_text(_markdown(df, impls), encoding="utf-8"))
    _atomic(png, lambda t: _plot(df, t))
    paths = [csv, md, png]
    if metrics:
        long = per_class_table(metrics)
        pcsv, pmd = out_dir / "ca_per_class.csv", out_dir / "ca_per_class.md"
        _atomic(pcsv, lambda t: long.to_csv(t, index=False))
        _atomic(pmd, lambda t: Path(t).write_text(_per_class_markdown(long, metrics), encoding="utf-8"))
        paths += [pcsv, pmd]
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.evaluate.table", description=__doc__.split("\n\n")[0])
    ap.add_argument("--metrics", nargs="+", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    df, impls, loaded = build_table(args.metrics)
    paths = write_tables(df, impls, args.out_dir, loaded)
    print(_markdown(df, impls), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
