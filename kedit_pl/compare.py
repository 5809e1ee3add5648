"""Aggregate finished runs into one table (markdown + CSV) and a bar chart.

    python -m kedit_pl.compare multirun/edit/2026-11-22_10-00-00 outputs/edit/... [--out DIR] [--allow-different-records]
                               [--seeds]

Every folder given is searched recursively for `summary.json` files written by edit.py. Config values that
differ between the runs (an Optuna sweep's trial parameters, a multirun's overrides) become columns, read from
each run's `.hydra/config.yaml` (else the method config in summary.json). Rows are sorted by the optimized metric
(`--sort`, default: the runs' `optimized_metric`, e.g. post/score), best first.

A summary.json that cannot be read (cut short, not a summary) is left out with a warning naming it; when none can
be read: one line, exit 2.

Each metric shows `mean [lo, hi]`, its 95 % bootstrap interval over records (summary.json `ci`). A post-edit
metric's best run is in bold only where its paired difference to every other run excludes 0 after Holm's correction
(paired bootstrap on the records both runs scored, from records.jsonl; `eval/intervals.py`); runs that cannot be
told apart from the best are marked ≈ (a tie). Runs scored on different records (summary.json `records_sha256`)
are not ranked: compare stops, unless `--allow-different-records`.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
from pathlib import Path
from typing import Any

from kedit_pl.errors import ConfigError, DamagedFile, DifferentRecords, KEditError
from kedit_pl.eval.intervals import leaders, paired
from kedit_pl.eval.record_values import read_values
from kedit_pl.eval.seeds import seed_markdown
from kedit_pl.io import atomic_path, read_json, write_text

log = logging.getLogger(__name__)

METRICS = ("es", "ps", "ns", "score")
#: token accuracies: on zsRE the efficacy / generalization / specificity of the MEND and MEMIT papers
ACCURACIES = ("rewrite_acc", "paraphrase_acc", "loc_acc")
#: the metric groups of `eval.metrics` (kedit_pl/eval/groups): fluency (ROME's GE), portability (token accuracy,
#: share of answers made more likely: post only), distracting-neighborhood NS, alias ES, WikiText perplexity
GROUP_METRICS = ("fluency_ge", "port_acc", "port_rise", "dn_ns", "alias_es", "ppl")
ALL_METRICS = METRICS + ACCURACIES + GROUP_METRICS
#: metrics where a smaller value is better
LOWER_IS_BETTER = ("ppl",)
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
    r["ci"] = {f"{g}_{k}": ci for g, cis in (s.get("ci") or {}).items() for k, ci in cis.items()}
    r["split"], r["records_sha256"] = run.get("split"), run.get("records_sha256")
    r["marks"] = {}
    return r


def check_same_records(rows: list[dict], allow: bool = False) -> None:
    """Refuse to rank runs whose selections differ (summary.json `run.records_sha256`), unless `allow`."""
    digests = {r["records_sha256"] for r in rows if r.get("records_sha256")}
    if len(digests) > 1 and not allow:
        a = rows[0]
        b = next(r for r in rows if r.get("records_sha256") and r["records_sha256"] != a.get("records_sha256"))
        raise DifferentRecords(
            f"the runs were scored on different records ({a['run_dir']}: {a.get('split')} split, "
            f"{str(a.get('records_sha256'))[:12]}; {b['run_dir']}: {b.get('split')} split, {b['records_sha256'][:12]}); "
            f"rank them anyway with --allow-different-records (head_to_head.allow_different_records=true)")


def mark_leaders(rows: list[dict], metrics: tuple[str, ...] = ALL_METRICS) -> None:
    """`r["marks"]["post_<m>"]` = "best" (its paired difference to every other run excludes 0 after Holm) or "tie" (no
    evidence the best is better than this run, or the best itself when it has such ties), for each post-edit metric."""
    if len(rows) < 2:
        return
    values = {i: r.get("values") for i, r in enumerate(rows)}
    tests_of: dict[tuple[int, int], dict] = {}  # (a, b) -> paired(a, b) for every metric, computed once
    for m in metrics:
        col = f"post_{m}"
        means = {i: r[col] for i, r in enumerate(rows) if r.get(col) is not None and values[i]}
        if len(means) < 2:
            continue
        lower = m in LOWER_IS_BETTER
        best = (min if lower else max)(means, key=means.get)
        for i in means:
            if i != best and (best, i) not in tests_of:
                tests_of[best, i] = paired(values[best], values[i])
        tests = {i: t for i in means if i != best and (t := tests_of[best, i].get(m)) is not None}
        if not tests:
            continue
        best, tied, _ = leaders(means, tests, higher_is_better=not lower)
        rows[best]["marks"][col] = "tie" if tied else "best"
        for i in tied:
            rows[i]["marks"][col] = "tie"


def paired_markdown(rows: list[dict], metrics: tuple[str, ...] = ALL_METRICS) -> str:
    """Each run against the first (best-sorted) one, paired on the records both scored: per post-edit metric
    'Δ [lo, hi] (p)', the difference run − first with its 95 % paired-bootstrap interval and two-sided p-value."""
    ref = rows[0] if rows else None
    others = [r for r in rows[1:] if r.get("values") and ref and ref.get("values")]
    if not others:
        return ""
    tests = [paired(r["values"], ref["values"]) for r in others]
    names = [m for m in metrics if any(m in t for t in tests)]
    label = lambda r: f"{r['method']} · {r['model']} · {r['run_dir']}"  # noqa: E731
    lines = [f"\nPaired differences, each run − {label(ref)} (post-edit, on the records both scored; paired "
             f"bootstrap, p two-sided):\n", "| run | n | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r, t in zip(others, tests):
        n = max((x.n for x in t.values()), default=0)
        cells = [f"{t[m].diff:+.1f} [{t[m].lo:+.1f}, {t[m].hi:+.1f}] (p {t[m].p:.3g})" if m in t else "" for m in names]
        lines.append(f"| {label(r)} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'method': {'lr': 1e-3}} -> {'method.lr': 1e-3}; lists become their string."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: str(tree) if isinstance(tree, list) else tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def run_config(run_dir: Path, method_config: dict) -> dict[str, Any]:
    """A run's composed config, flattened: `.hydra/config.yaml` (unresolved: it names Hydra's own resolvers), with
    the method's values as the run resolved them (summary.json), so that a default read through an interpolation
    (`${oc.select:model.method_defaults...}`) compares equal to the same value set on the command line."""
    resolved = flatten({"method": method_config})
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        from omegaconf import OmegaConf

        return flatten(OmegaConf.to_container(OmegaConf.load(saved), resolve=False)) | resolved
    return resolved


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


def _metric_cell(r: dict, c: str) -> str:
    """'97.5 [95.0, 99.5]', in bold when best in its column, with ≈ when tied for best."""
    v, ci = r.get(c), r["ci"].get(c)
    if v is None:
        return ""
    text = f"{v:.1f}" + (f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else "")
    mark = r["marks"].get(c)
    return f"**{text}**" if mark == "best" else f"{text} ≈" if mark == "tie" else text


#: printed under a table with marks
MARKS_LEGEND = ("mean [95 % bootstrap interval over records]; **bold**: best in its column, its paired difference to "
                "every other run excludes 0 after Holm's correction; ≈: tied for best (paired bootstrap, "
                "kedit_pl/eval/intervals.py)")


def markdown(rows: list[dict]) -> str:
    """The table; columns empty in every row (e.g. zsRE's loc_acc on CounterFact runs) are left out."""
    cols = [c for c in columns(rows) if c != "run_dir" and any(cell(r, c) not in (None, "") for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    metric_cols = {f"{g}_{m}" for g in ("pre", "post") for m in ALL_METRICS}

    def fmt(r: dict, c: str) -> str:
        if c in metric_cols:
            return _metric_cell(r, c)
        return f"{r[c]:.2f}" if c == "s_per_edit" and r[c] is not None else _fmt_cell(cell(r, c))

    lines += ["| " + " | ".join(fmt(r, c) for c in cols) + " |" for r in rows]
    legend = f"\n{MARKS_LEGEND}\n" if any(r["marks"] or r["ci"] for r in rows) else ""
    return "\n".join(lines) + "\n" + legend


def to_csv(rows: list[dict]) -> str:
    """The table's values, each metric followed by its interval's bounds (<metric>_lo, <metric>_hi) where known."""
    buf = io.StringIO()
    cols = [b for c in columns(rows) for b in ([c, f"{c}_lo", f"{c}_hi"] if any(c in r["ci"] for r in rows) else [c])]
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in rows:
        bounds = {f"{c}_{end}": b for c, ci in r["ci"].items() for end, b in zip(("lo", "hi"), ci)}
        w.writerow({c: bounds[c] if c in bounds else cell(r, c) for c in cols})
    return buf.getvalue()


def bar_chart(rows: list[dict], path: Path) -> Path:
    """Post-edit ES/PS/NS/Score per run (with 95 % bootstrap intervals), and seconds per edit, side by side."""
    import matplotlib

    from kedit_pl.eval.report import error_bars

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['method']}\n{r['model']}" for r in rows]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(rows) + 4), 3.8),
                                   gridspec_kw={"width_ratios": [3, 1]})
    x = np.arange(len(rows))
    w = 0.8 / len(METRICS)
    for i, m in enumerate(METRICS):
        vals = [r[f"post_{m}"] or 0 for r in rows]
        bars = ax.bar(x + i * w - 0.4 + w / 2, vals, w, label=m.upper() if m != "score" else "Score",
                      yerr=error_bars(vals, [r["ci"].get(f"post_{m}") for r in rows]), capsize=2,
                      error_kw={"elinewidth": 0.8})
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


def compare(dirs: list[str | Path], out: Path, sort: str | None = None,
            allow_different_records: bool = False, seeds: bool = False) -> list[dict]:
    """Write `comparison.md`, `comparison.csv` and `comparison.png` of the runs under `dirs` into `out`; returns
    the rows, best first. Runs on different records are refused unless `allow_different_records`. `seeds`: also
    `seeds.md`, mean ± sd over the training seeds of learned editors (`eval/seeds.py`)."""
    paths = find_summaries(dirs)
    if not paths:
        raise ConfigError(f"compare: no summary.json under {', '.join(map(str, dirs))}")
    summaries = {p: s for p in paths if (s := read_summary(p)) is not None}
    if not summaries:
        raise DamagedFile(f"compare: none of the {len(paths)} summary.json file(s) under {', '.join(map(str, dirs))} "
                          f"can be read (first: {paths[0]}); nothing to compare")
    rows = [row(p, s) for p, s in summaries.items()]
    check_same_records(rows, allow_different_records)
    for r in rows:  # per-record post-edit values (records.jsonl), for the paired tests
        r["values"] = read_values(r["run_dir"], "post") if len(rows) > 1 else None
    mark_leaders(rows)
    rows.sort(key=sort_key(sort or optimized_metric(rows)))
    write_text(out / "comparison.md", markdown(rows) + paired_markdown(rows))
    write_text(out / "comparison.csv", to_csv(rows))
    bar_chart(rows, out / "comparison.png")
    if seeds:
        table = seed_markdown(rows, varying_keys(rows), ALL_METRICS)
        if not table:
            raise ConfigError("compare --seeds: no run names an editor (method.checkpoint) whose training run "
                              "recorded its seed (train_summary.json)")
        write_text(out / "seeds.md", table)
    return rows


def main(argv: list[str] | None = None) -> None:
    """`python -m kedit_pl.compare RUN_DIR... [--out DIR] [--sort METRIC]`."""
    ap = argparse.ArgumentParser(prog="python -m kedit_pl.compare", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", help="run or multirun folders holding summary.json files")
    ap.add_argument("--out", type=Path, default=None, help="where to write comparison.{md,csv,png} (default: first folder)")
    ap.add_argument("--sort", default=None, help="metric to sort by, best first, e.g. post/es (default: the runs' "
                                                 "optimized_metric)")
    ap.add_argument("--allow-different-records", action="store_true",
                    help="rank runs even when they were scored on different records (summary.json digests differ)")
    ap.add_argument("--seeds", action="store_true",
                    help="learned editors: mean ± sd over training seeds of runs that differ only in their editor's "
                         "seed (seeds.md)")
    args = ap.parse_args(argv)
    out = args.out or Path(args.dirs[0])
    logging.basicConfig(format="%(levelname)s: %(message)s")
    try:
        rows = compare(args.dirs, out, args.sort, args.allow_different_records, args.seeds)
    except KEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(markdown(rows) + paired_markdown(rows))
    if args.seeds:
        sys.stdout.write("\n" + (out / "seeds.md").read_text())
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, comparison.png" + (", seeds.md" if args.seeds else ""))


if __name__ == "__main__":
    main()
