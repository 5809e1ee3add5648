"""Aggregate finished runs into one table (markdown + CSV) and a bar chart.

    python -m kedit_pl.compare multirun/edit/2026-11-22_10-00-00 outputs/edit/... [--out DIR]

Every folder given is searched recursively for `summary.json` files written by edit.py.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path
from typing import Any

from kedit_pl.io import atomic_path, read_json, write_text

METRICS = ("es", "ps", "ns", "score")
#: token accuracies: on zsRE the efficacy / generalization / specificity of the MEND and MEMIT papers
ACCURACIES = ("rewrite_acc", "paraphrase_acc", "loc_acc")
#: the metric groups of `eval.metrics` (kedit_pl/eval/groups): fluency (ROME's GE), portability (token accuracy,
#: share of answers made more likely: post only), distracting-neighborhood NS, alias ES, WikiText perplexity
GROUP_METRICS = ("fluency_ge", "port_acc", "port_rise", "dn_ns", "alias_es", "ppl")
ALL_METRICS = METRICS + ACCURACIES + GROUP_METRICS
COLUMNS = ("method", "model", "dataset", "mode", "n") + tuple(f"pre_{m}" for m in ALL_METRICS) + \
    tuple(f"post_{m}" for m in ALL_METRICS) + ("s_per_edit", "peak_rss_mb", "run_dir")


def find_summaries(dirs: list[str | Path]) -> list[Path]:
    found = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "summary.json":
            found.append(d)
        elif d.is_dir():
            found.extend(sorted(d.rglob("summary.json")))
    return found


def row(path: Path) -> dict[str, Any]:
    s = read_json(path)
    run = s.get("run", {})
    r: dict[str, Any] = {k: run.get(k, "") for k in ("method", "model", "dataset", "mode")}
    r["n"] = int(s.get("timing", {}).get("n_edits", 0))
    for g in ("pre", "post"):
        for m in ALL_METRICS:
            r[f"{g}_{m}"] = s.get(g, {}).get(m)
    r["s_per_edit"] = s.get("timing", {}).get("seconds_per_edit")
    r["peak_rss_mb"] = s.get("timing", {}).get("peak_rss_mb")
    r["run_dir"] = str(path.parent)
    return r


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v))


def markdown(rows: list[dict]) -> str:
    """The table; columns empty in every row (e.g. zsRE's loc_acc on CounterFact runs) are left out."""
    cols = [c for c in COLUMNS if c != "run_dir" and any(r.get(c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda r, c: f"{r[c]:.2f}" if c == "s_per_edit" and r[c] is not None else _fmt(r[c])  # noqa: E731
    lines += ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def bar_chart(rows: list[dict], path: Path) -> Path:
    """Post-edit ES/PS/NS/Score per run, and seconds per edit, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['method']}\n{r['model']}" for r in rows]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(rows) + 4), 3.8),
                                   gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(rows))
    w = 0.8 / len(METRICS)
    for i, m in enumerate(METRICS):
        bars = ax.bar(x + i * w - 0.4 + w / 2, [r[f"post_{m}"] or 0 for r in rows], w,
                      label=m.upper() if m != "score" else "Score")
        ax.bar_label(bars, fmt="%.0f", fontsize=6)
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("post-edit %")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.15))
    bars = ax_t.bar(x, [r["s_per_edit"] or 0 for r in rows], color="gray")
    ax_t.bar_label(bars, fmt="%.1f", fontsize=7)
    ax_t.set_xticks(x, labels, fontsize=7)
    ax_t.set_ylabel("seconds per edit")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def compare(dirs: list[str | Path], out: Path) -> list[dict]:
    paths = find_summaries(dirs)
    if not paths:
        raise SystemExit(f"error: no summary.json under {', '.join(map(str, dirs))}")
    rows = sorted((row(p) for p in paths), key=lambda r: (r["model"], r["method"]))
    write_text(out / "comparison.md", markdown(rows))
    write_text(out / "comparison.csv", to_csv(rows))
    bar_chart(rows, out / "comparison.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m kedit_pl.compare", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun folders holding summary.json files")
    ap.add_argument("--out", type=Path, default=None, help="where to write comparison.{md,csv,png} (default: first folder)")
    args = ap.parse_args(argv)
    out = args.out or Path(args.dirs[0])
    rows = compare(args.dirs, out)
    sys.stdout.write(markdown(rows))
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, comparison.png")


if __name__ == "__main__":
    main()
