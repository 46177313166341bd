"""Table-1-shaped ablation table from several metrics.json files.

    python -m pipeline.evaluate.table --metrics a.json b.json ... --out-dir results/tables

Writes (each atomically: temp file + os.replace) ``ablation.csv``, ``ablation.md`` (with a line naming the
implementations behind each column) and ``ablation.png`` (grouped bar chart, matplotlib Agg).
Rows = experiments in the order given; columns = BLEU-4, ROUGE-L, METEOR (merged report vs findings) and
CA-F1 macro (labeler on reference and generated text).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS: tuple[str, ...] = ("BLEU-4", "ROUGE-L", "METEOR", "CA-F1 macro")


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


def row_from_metrics(m: dict) -> tuple[dict, dict]:
    """One table row and the implementation behind each of its columns."""
    rep = m["nlg"]["report"]
    ca = m["clinical"]["labeler_vs_labeler"]
    row = {
        "experiment": m["experiment"],
        "n_volumes": m["n_volumes"],
        "BLEU-4": rep["BLEU-4"]["value"],
        "ROUGE-L": rep["ROUGE-L"]["value"],
        "METEOR": rep["METEOR"]["value"],
        "CA-F1 macro": ca["macro_f1"],
    }
    impl = {
        "BLEU-4": rep["BLEU-4"]["implementation"],
        "ROUGE-L": rep["ROUGE-L"]["implementation"],
        "METEOR": rep["METEOR"]["implementation"],
        "CA-F1 macro": ca.get("implementation", m.get("implementations", {}).get("CA-F1", "unknown")),
    }
    return row, impl


def build_table(metrics_paths: list[Path]) -> tuple[pd.DataFrame, dict[str, str]]:
    rows, impls = [], {}
    for p in metrics_paths:
        with open(p) as f:
            m = json.load(f)
        row, impl = row_from_metrics(m)
        rows.append(row)
        for k, v in impl.items():
            if impls.setdefault(k, v) != v:
                raise ValueError(
                    f"{p}: {k} implementation differs from earlier files ({v!r} vs {impls[k]!r})"
                )
    names = [r["experiment"] for r in rows]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate experiment names: {dup}")
    return pd.DataFrame(rows, columns=["experiment", "n_volumes", *COLUMNS]), impls


def _markdown(df: pd.DataFrame, impls: dict[str, str]) -> str:
    head = "| experiment | n | " + " | ".join(COLUMNS) + " |"
    sep = "|---|---:|" + "---:|" * len(COLUMNS)
    lines = [head, sep]
    for _, r in df.iterrows():
        cells = ["n/a" if pd.isna(r[c]) else f"{r[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {r['experiment']} | {int(r['n_volumes'])} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Implementations: " + "; ".join(f"{k}: {v}" for k, v in impls.items()) + ".")
    return "\n".join(lines) + "\n"


def _plot(df: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n_exp = len(df)
    x = np.arange(len(COLUMNS))
    width = 0.8 / max(n_exp, 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(COLUMNS) + 0.4 * n_exp), 4))
    for i, (_, r) in enumerate(df.iterrows()):
        vals = [0.0 if pd.isna(r[c]) else float(r[c]) for c in COLUMNS]
        ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=str(r["experiment"]))
    ax.set_xticks(x)
    ax.set_xticklabels(COLUMNS)
    ax.set_ylabel("score")
    ax.set_title("Ablation (merged report vs findings)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def write_tables(df: pd.DataFrame, impls: dict[str, str], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    csv, md, png = out_dir / "ablation.csv", out_dir / "ablation.md", out_dir / "ablation.png"
    _atomic(csv, lambda t: df.to_csv(t, index=False))
    _atomic(md, lambda t: Path(t).write_text(_markdown(df, impls)))
    _atomic(png, lambda t: _plot(df, t))
    return [csv, md, png]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.evaluate.table", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--metrics", nargs="+", required=True, type=Path)
    ap.add_argument("--out-dir", required=True, type=Path)
    args = ap.parse_args(argv)
    df, impls = build_table(args.metrics)
    paths = write_tables(df, impls, args.out_dir)
    print(_markdown(df, impls), end="")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
