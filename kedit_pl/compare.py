"""Aggregate finished runs into one table (markdown + CSV) and a bar chart.

    python -m kedit_pl.compare multirun/edit/2026-11-22_10-00-00 outputs/edit/... [--out DIR]

Every folder given is searched recursively for `summary.json` files written by edit.py. Config values that
differ between the runs (an Optuna sweep's trial parameters, a multirun's overrides) become columns, read from
each run's `.hydra/config.yaml` (else the method config in summary.json). Rows are sorted by the optimized metric
(`--sort`, default: the runs' `optimized_metric`, e.g. post/score), best first. A summary.json that cannot be read
(cut short, not a summary) is left out with a warning naming it; when none can be read: one line, exit 2.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from kedit_pl.errors import ConfigError, DamagedFile, KEditError
from kedit_pl.io import atomic_path, read_json, write_text

log = logging.getLogger(__name__)

METRICS = ("es", "ps", "ns", "score")
#: token accuracies: on zsRE the efficacy / generalization / specificity of the MEND and MEMIT papers
ACCURACIES = ("rewrite_acc", "paraphrase_acc", "loc_acc")
#: the metric groups of `eval.metrics` (kedit_pl/eval/groups): fluency (ROME's GE), portability (token accuracy,
#: share of answers made more likely: post only), distracting-neighborhood NS, alias ES, WikiText perplexity
GROUP_METRICS = ("fluency_ge", "port_acc", "port_rise", "dn_ns", "alias_es", "ppl")
ALL_METRICS = METRICS + ACCURACIES + GROUP_METRICS
COLUMNS = ("method", "model", "dataset", "mode", "n") + tuple(f"pre_{m}" for m in ALL_METRICS) + \
    tuple(f"post_{m}" for m in ALL_METRICS) + ("s_per_edit", "peak_rss_mb", "run_dir")


#: config keys that differ between runs without describing them (where they write, how they log)
UNDESCRIPTIVE = ("paths.", "logger.", "hydra.", "trainer.logger")


def find_summaries(dirs: list[str | Path]) -> list[Path]:
    """Every `summary.json` under the given run or multirun folders (or the files themselves), sorted per folder."""
    found = []
    for d in dirs:
        d = Path(d)
        if d.is_file() and d.name == "summary.json":
            found.append(d)
        elif d.is_dir():
            found.extend(sorted(d.rglob("summary.json")))
    return found


def read_summary(path: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None with a warning naming the file when it is unreadable or not a summary (a
    run killed while writing it, a stray file): that run is left out of the comparison."""
    try:
        s = read_json(path)
    except (OSError, ValueError) as e:
        log.warning("compare: skipping %s: unreadable (%s)", path, str(e).splitlines()[0])
        return None
    if not isinstance(s, dict) or not isinstance(s.get("run", {}), dict):
        log.warning("compare: skipping %s: not a summary written by edit.py (holds a JSON %s)", path,
                    type(s).__name__ if not isinstance(s, dict) else "object without a 'run' object")
        return None
    return s


def row(path: Path, s: dict[str, Any] | None = None) -> dict[str, Any]:
    """One table row from a `summary.json`: run identity, record count, pre/post metrics, timing and the run's
    config (where swept values come from)."""
    s = read_json(path) if s is None else s
    run = s.get("run", {})
    r: dict[str, Any] = {k: run.get(k, "") for k in ("method", "model", "dataset", "mode")}
    r["n"] = int(s.get("timing", {}).get("n_edits", 0))
    for g in ("pre", "post"):
        for m in ALL_METRICS:
            r[f"{g}_{m}"] = s.get(g, {}).get(m)
    r["s_per_edit"] = s.get("timing", {}).get("seconds_per_edit")
    r["peak_rss_mb"] = s.get("timing", {}).get("peak_rss_mb")
    r["run_dir"] = str(path.parent)
    r["config"] = run_config(path.parent, run.get("config") or {})
    r["metrics"] = {f"{g}/{k}": v for g in ("pre", "post", "final") for k, v in s.get(g, {}).items()}
    return r


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'method': {'lr': 1e-3}} -> {'method.lr': 1e-3}; lists become their string."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: str(tree) if isinstance(tree, list) else tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def run_config(run_dir: Path, method_config: dict) -> dict[str, Any]:
    """A run's composed config, flattened (`.hydra/config.yaml`, unresolved; else summary.json's method config)."""
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        from omegaconf import OmegaConf

        return flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False))
    return flatten({"method": method_config})


def varying_keys(rows: list[dict]) -> list[str]:
    """Config keys whose values are not the same in every run (the columns that tell runs apart). A group whose
    `name` differs (method, model, dataset) is already told apart by its column, so its other keys are left out."""
    shared = set.intersection(*(set(r["config"]) for r in rows)) if rows else set()
    differs = [k for k in sorted(shared) if not k.startswith(UNDESCRIPTIVE)
               and len({repr(r["config"][k]) for r in rows}) > 1]
    renamed = {k[:-len("name")] for k in differs if k.endswith(".name") and k.count(".") == 1}
    return [k for k in differs if not k.startswith(tuple(renamed))]


def columns(rows: list[dict]) -> list[str]:
    """COLUMNS with the varying config values after the run's identity (method ... n)."""
    head = list(COLUMNS[:COLUMNS.index("n") + 1])
    return head + varying_keys(rows) + [c for c in COLUMNS if c not in head]


def cell(r: dict, c: str) -> Any:
    """Value of column `c` in a row: a metric or identity field, else a config value."""
    return r[c] if c in r else r["config"].get(c)


def sort_key(metric: str | None):
    """Best first by `metric` ('post/score'); runs without it last; ties and no metric: by model, method."""
    def key(r: dict):
        v = r["metrics"].get(metric) if metric else None
        return (v is None, -(v or 0.0), r["model"], r["method"])
    return key


def optimized_metric(rows: list[dict]) -> str | None:
    """The runs' `optimized_metric` when they agree on one."""
    found = {r["config"].get("optimized_metric") for r in rows} - {None}
    return found.pop() if len(found) == 1 else None


def _fmt(v: Any) -> str:
    return f"{v:.1f}" if isinstance(v, float) else ("" if v is None else str(v))


def _fmt_cell(v: Any) -> str:
    """Metrics with one decimal; small config floats (learning rates, bounds) in 3 significant digits."""
    return f"{v:.3g}" if isinstance(v, float) and v != 0 and abs(v) < 0.1 else _fmt(v)


def markdown(rows: list[dict]) -> str:
    """The table; columns empty in every row (e.g. zsRE's loc_acc on CounterFact runs) are left out."""
    cols = [c for c in columns(rows) if c != "run_dir" and any(cell(r, c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    fmt = lambda r, c: f"{r[c]:.2f}" if c == "s_per_edit" and r[c] is not None else _fmt_cell(cell(r, c))  # noqa: E731
    lines += ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict]) -> str:
    """The rows as CSV text, one column per metric and swept value."""
    buf = io.StringIO()
    cols = columns(rows)
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    w.writerows({c: cell(r, c) for c in cols} for r in rows)
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


def compare(dirs: list[str | Path], out: Path, sort: str | None = None) -> list[dict]:
    """Write `comparison.md`, `comparison.csv` and `comparison.png` of the runs under `dirs` into `out`; returns
    the rows, best first."""
    paths = find_summaries(dirs)
    if not paths:
        raise ConfigError(f"compare: no summary.json under {', '.join(map(str, dirs))}")
    summaries = {p: s for p in paths if (s := read_summary(p)) is not None}
    if not summaries:
        raise DamagedFile(f"compare: none of the {len(paths)} summary.json file(s) under {', '.join(map(str, dirs))} "
                          f"can be read (first: {paths[0]}); nothing to compare")
    rows = [row(p, s) for p, s in summaries.items()]
    rows.sort(key=sort_key(sort or optimized_metric(rows)))
    write_text(out / "comparison.md", markdown(rows))
    write_text(out / "comparison.csv", to_csv(rows))
    bar_chart(rows, out / "comparison.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m kedit_pl.compare RUN_DIR... [--out DIR] [--sort METRIC]`."""
    ap = argparse.ArgumentParser(prog="python -m kedit_pl.compare", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun folders holding summary.json files")
    ap.add_argument("--out", type=Path, default=None, help="where to write comparison.{md,csv,png} (default: first folder)")
    ap.add_argument("--sort", default=None, help="metric to sort by, best first, e.g. post/es (default: the runs' "
                                                 "optimized_metric)")
    args = ap.parse_args(argv)
    out = args.out or Path(args.dirs[0])
    logging.basicConfig(format="%(levelname)s: %(message)s")
    try:
        rows = compare(args.dirs, out, args.sort)
    except KEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(markdown(rows))
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, comparison.png")


if __name__ == "__main__":
    main()
