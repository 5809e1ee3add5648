"""Lifelong-editing study: ROME, r-ROME, MEMIT, EMMET, AlphaEdit applied sequentially to the same records.

    python bench/lifelong.py [--model smollm2_135m] [--n-edits 100] [--rome-batch 1] [--memit-batch 20]
                             [--methods rome r_rome memit emmet alphaedit] [--rome-every 10] [--memit-every 1]
                             [--sample 100] [--out /work/runs/lifelong/study] [--figure docs/figures/lifelong.png]
                             [--report-only] [--set key=value ...] [--variant LABEL=METHOD:key=value,...]

Each method is one `edit.py` run in sequential mode with the lifelong protocol (kedit_pl/eval/lifelong.py:
ES/PS/NS over a fixed sample of the edits so far, WikiText-2 perplexity and ‖ΔW‖ every k batches, stop on
collapse) in <out>/<method>/. A method whose folder already holds a summary.json is not rerun; an interrupted
one continues from its last checkpoint (edit.resume=true, kedit_pl/sequential_state.py). Then the curves of
every method are drawn into one figure (one line per method) and a markdown table is written to <out>/table.md:
the final scoring of every edit on the last model (`final`, the AlphaEdit protocol) beside the score right after
each batch (`post`), perplexity at start and end, ‖ΔW‖, whether it collapsed, and the wall time of each run (of
a resumed one: summed over its runs up to their last checkpoints, `summary.json → timing.wall_seconds`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kedit_pl.config import REPO_ROOT
from kedit_pl.eval.lifelong import ROWS_FILE, collapse_limit, plot_curves
from kedit_pl.io import read_json, write_json, write_text

ROME_FAMILY = ("rome", "r_rome")
METHODS = ("rome", "r_rome", "memit", "emmet", "alphaedit", "grace", "ike", "wise", "malmen")


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """'LABEL=METHOD:key=value,key=value' -> (label, method, overrides): a method with other settings."""
    label, _, rest = spec.partition("=")
    method, _, overrides = rest.partition(":")
    if not label or method not in METHODS:
        raise SystemExit(f"--variant {spec!r}: expected LABEL=METHOD[:key=value,...] with METHOD in {METHODS}")
    return label, method, [o for o in overrides.split(",") if o]


def run_command(label: str, args: argparse.Namespace, folder: Path) -> list[str]:
    method, extra = args.runs[label]
    rome = method in ROME_FAMILY
    return [sys.executable, str(REPO_ROOT / "edit.py"), f"model={args.model}", f"method={method}",
            "edit.mode=sequential", f"edit.batch_size={args.rome_batch if rome else args.memit_batch}",
            f"dataset.limit={args.n_edits}", f"edit.lifelong.every={args.rome_every if rome else args.memit_every}",
            f"edit.lifelong.sample={args.sample}", "logger=csv", f"hydra.run.dir={folder}", *args.set, *extra]


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Run one method unless its summary exists; returns {"returncode", "wall_seconds", "command"}."""
    folder = Path(args.out) / method
    wall = Path(args.out) / f"{method}.wall.json"  # one file per method: several study processes may run at once
    if (folder / "summary.json").is_file():
        return read_json(wall) if wall.is_file() else {}
    resume = (folder / "records.jsonl").is_file()  # interrupted: continue from its last checkpoint
    cmd = run_command(method, args, folder) + (["edit.resume=true"] if resume else [])
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with open(Path(args.out) / f"{method}.log", "a" if resume else "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    result = {"returncode": rc, "wall_seconds": time.perf_counter() - start, "command": " ".join(cmd),
              "resumed": resume}
    write_json(wall, result)
    return result


def table_row(method: str, summary: dict, wall: dict) -> dict:
    life = summary.get("lifelong") or {}
    rows = life.get("rows") or [{}]
    final, post = summary.get("final", {}), summary.get("post", {})
    n = int(summary.get("timing", {}).get("n_edits", 0))
    ci = summary.get("ci") or {}
    return {"method": method, "batch": summary.get("run", {}).get("batch_size"), "edits": n,
            **{f"final_{k}": with_interval(final.get(k), (ci.get("final") or {}).get(k))
               for k in ("es", "ps", "ns", "score")},
            **{f"post_{k}": with_interval(post.get(k), (ci.get("post") or {}).get(k)) for k in ("es", "ps", "ns")},
            "ppl_start": life.get("start_perplexity"), "ppl_end": rows[-1].get("perplexity"),
            "dW": rows[-1].get("delta_norm_total"), "collapsed": life.get("collapsed"),
            "s_per_edit": summary.get("timing", {}).get("seconds_per_edit"),
            "wall_s": (summary.get("timing", {}).get("wall_seconds") if wall.get("resumed") else None)
            or wall.get("wall_seconds", summary.get("timing", {}).get("wall_seconds"))}  # resumed: over all runs


def with_interval(value: float | None, ci: list[float] | None) -> str | float | None:
    """`value [lo, hi]` (its 95 % bootstrap interval over records) where the run holds one, else the value."""
    if value is None or not ci:
        return value
    return f"{value:.1f} [{ci[0]:.1f}, {ci[1]:.1f}]"


def markdown(rows: list[dict]) -> str:
    head = ("method", "batch", "edits", "final ES", "final PS", "final NS", "final Score", "post ES", "post PS",
            "post NS", "ppl start", "ppl end", "‖ΔW‖", "s/edit", "wall s", "collapsed")
    keys = ("method", "batch", "edits", "final_es", "final_ps", "final_ns", "final_score", "post_es", "post_ps",
            "post_ns", "ppl_start", "ppl_end", "dW", "s_per_edit", "wall_s", "collapsed")

    def fmt(v) -> str:
        return "" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def curve_table(curves: dict[str, list[dict]]) -> str:
    """Every lifelong checkpoint: ES/PS/NS over the edits so far (with their 95 % intervals over the scored
    records, where the rows hold them), perplexity and ‖ΔW‖, per method."""
    lines = ["| method | edits | ES | PS | NS | perplexity | ‖ΔW‖ |", "|---|---|---|---|---|---|---|"]
    for label, rows in curves.items():
        for r in rows:
            rates = [with_interval(r.get(k), (r.get("ci") or {}).get(k)) for k in ("es", "ps", "ns")]
            cells = [v if isinstance(v, str) else "" if v is None else f"{v:.1f}" for v in rates]
            cells += ["" if r.get(k) is None else f"{r[k]:.2f}" for k in ("perplexity", "delta_norm_total")]
            lines.append(f"| {label} | {r['n_edits']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(args: argparse.Namespace) -> str:
    out = Path(args.out)
    rows, curves, limits = [], {}, set()
    for method in args.runs:
        path, partial = out / method / "summary.json", out / method / ROWS_FILE
        if path.is_file():
            summary = read_json(path)
            wall = out / f"{method}.wall.json"
            rows.append(table_row(method, summary, read_json(wall) if wall.is_file() else {}))
            life = summary.get("lifelong") or {}
            curves[f"{method} (collapsed)" if life.get("collapsed") else method] = life.get("rows", [])
            limits.add(run_collapse_limit(out / method, life))
        elif partial.is_file():  # still running (or killed): its checkpoints so far, in the curves only
            curves[f"{method} (unfinished)"] = [json.loads(x) for x in partial.read_text().splitlines() if x.strip()]
    text = markdown(rows) + "\n" + curve_table(curves)
    write_text(out / "table.md", text)
    write_json(out / "table.json", rows)
    if curves:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        plot_curves(curves, args.figure, limits.pop() if len(limits) == 1 else None)  # one model: one start
    return text


def run_collapse_limit(folder: Path, life: dict) -> float | None:
    """A finished run's collapse limit, from its `run.json` (the collapse factor) and its start perplexity;
    rounded so that runs of one model share one line."""
    factor = (read_json(folder / "run.json").get("lifelong") or {}).get("collapse_factor") \
        if (folder / "run.json").is_file() else None
    limit = collapse_limit(factor, life.get("start_perplexity"))
    return None if limit is None else round(limit, 6)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2_135m")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--n-edits", type=int, default=100)
    p.add_argument("--rome-batch", type=int, default=1)
    p.add_argument("--memit-batch", type=int, default=20)
    p.add_argument("--rome-every", type=int, default=10, help="batches between lifelong checkpoints (ROME family)")
    p.add_argument("--memit-every", type=int, default=1, help="batches between lifelong checkpoints (MEMIT family)")
    p.add_argument("--sample", type=int, default=100, help="records in the fixed lifelong evaluation sample")
    p.add_argument("--out", default="/work/runs/lifelong/study")
    p.add_argument("--figure", default=str(REPO_ROOT / "docs" / "figures" / "lifelong.png"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--variant", nargs="*", default=[], help="LABEL=METHOD:key=value,... extra runs")
    args = p.parse_args(argv)
    args.runs = {m: (m, []) for m in args.methods}
    args.runs.update({label: (m, extra) for label, m, extra in map(parse_variant, args.variant)})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for method in args.runs:
            result = run_method(method, args)
            print(method, json.dumps(result), flush=True)
            report(args)
    print(report(args))


if __name__ == "__main__":
    main()
