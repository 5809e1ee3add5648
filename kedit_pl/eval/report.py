"""Turning a run's summary into files people look at: summary.json, a printed table, a bar chart."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kedit_pl.io import atomic_path, write_json

#: the columns shown first, in this order, when present
HEADLINE = ("es", "ps", "ns", "score", "em", "pm", "nm", "rewrite_acc", "paraphrase_acc", "neighborhood_acc", "loc_acc")
GROUPS = ("pre", "post", "final")


def write_summary_files(out_dir: str | Path, summary: dict[str, Any]) -> dict[str, Path]:
    """Write `summary.json`, `metrics.png` and (sequential runs) `retention.png`; returns their paths."""
    out = Path(out_dir)
    paths = {"summary": out / "summary.json"}
    write_json(paths["summary"], summary)
    try:
        paths["plot"] = bar_chart_pre_post(summary, out / "metrics.png")
        if summary.get("retention"):
            paths["retention_plot"] = retention_chart(summary, out / "retention.png")
    except Exception:  # a plot must never cost the results
        pass
    return paths


#: printed under the table whenever magnitudes are shown
LEGEND = ("em/pm/nm: mean P(new)-P(true) on rewrite/paraphrase prompts, P(true)-P(new) on neighbors, in points "
          "(P = exp(-mean token NLL))")


def table_rows(summary: dict[str, Any]) -> tuple[str, list[str], list[list[str]], str]:
    """(title, header, rows, caption) of the result table."""
    run = summary.get("run", {})
    title = "kedit_pl results  " + " · ".join(str(run[k]) for k in ("method", "model", "dataset", "mode") if k in run)
    groups = [g for g in GROUPS if g in summary]
    names = [k for k in HEADLINE if any(k in summary[g] for g in groups)]
    ci = summary.get("ci") or {}
    t = summary.get("timing", {})
    counts = summary.get("n_per_metric") or {}
    label = lambda k: f"{k} (n={counts[k]})" if k in counts and t and counts[k] != t["n_edits"] else k  # noqa: E731
    rows = [[label(k), *[with_interval(summary[g][k], (ci.get(g) or {}).get(k)) if k in summary[g] else "" for g in groups]]
            for k in names]
    caption = (f"{int(t['n_edits'])} edits · {t['seconds_per_edit']:.2f} s/edit · peak RSS {t['peak_rss_mb']:.0f} MB"
               if t else "")
    if t.get("processes"):
        caption += f" (the largest of {t['processes']} processes)"
    return title, ["metric", *groups], rows, caption


def with_interval(value: float, ci: list[float] | None) -> str:
    """'97.5 [95.0, 99.5]': a mean and its 95 % bootstrap interval (the mean alone when there is none)."""
    return f"{value:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")


def error_bars(values: list[float], cis: list[list[float] | None]):
    """matplotlib's yerr (2, n) for bars of `values` with intervals `cis` (0 where a bar has none)."""
    import numpy as np

    lo = [v - c[0] if c else 0.0 for v, c in zip(values, cis)]
    hi = [c[1] - v if c else 0.0 for v, c in zip(values, cis)]
    return np.clip(np.array([lo, hi]), 0.0, None)


def plain_table(summary: dict[str, Any]) -> str:
    """The table as plain aligned text (for logs and pipes: no box drawing, no terminal width)."""
    title, header, rows, caption = table_rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [title, fmt(header), "  ".join("-" * w for w in widths), *map(fmt, rows)]
    return "\n".join(lines + ([caption] if caption else []))


def print_table(summary: dict[str, Any]) -> None:
    """A rich table on a terminal, plain text otherwise; with the em/pm/nm legend when they are shown."""
    import sys

    title, header, rows, caption = table_rows(summary)
    legend = any(r[0] in ("em", "pm", "nm") for r in rows)
    if not sys.stdout.isatty():
        print(plain_table(summary) + (f"\n{LEGEND}" if legend else ""), flush=True)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=caption or None)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    console = Console()
    console.print(table)
    if legend:
        console.print(LEGEND, style="dim")


def bar_chart_pre_post(summary: dict[str, Any], path: Path) -> Path:
    """Grouped bars of ES/PS/NS/Score before and after editing, with their 95 % bootstrap intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups = [g for g in GROUPS if g in summary]
    names = [k for k in ("es", "ps", "ns", "score") if k in summary.get("post", {})]
    x = np.arange(len(names))
    w = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, g in enumerate(groups):
        vals = [summary[g].get(k, 0.0) for k in names]
        cis = [((summary.get("ci") or {}).get(g) or {}).get(k) for k in names]
        bars = ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=g, yerr=error_bars(vals, cis), capsize=2,
                      error_kw={"elinewidth": 0.8})
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(x, [n.upper() if n != "score" else "Score" for n in names])
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    run = summary.get("run", {})
    ax.set_title(f"{run.get('method', '')} on {run.get('model', '')} ({run.get('dataset', '')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def retention_chart(summary: dict[str, Any], path: Path) -> Path:
    """Sequential mode: each batch's ES/PS/NS right after it was applied vs after the last batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["retention"]
    keys = [k for k in ("es", "ps", "ns") if k in rows[0]["post"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        b = [r["batch"] for r in rows]
        ax.plot(b, [r["post"][k] for r in rows], "o-", label="right after its batch")
        ax.plot(b, [r["final"][k] for r in rows], "s--", label="after the last batch")
        ax.set_title(k.upper())
        ax.set_xlabel("batch (order applied)")
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    run = summary.get("run", {})
    fig.suptitle(f"retention: {run.get('method', '')} on {run.get('model', '')} ({run.get('dataset', '')})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
