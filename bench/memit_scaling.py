"""MEMIT scaling: ES/PS/NS/Score and wall time vs number of edits, with sequential ROME for comparison.

    python bench/memit_scaling.py [--model smollm2_135m] [--counts 1 10 100 1000] [--rome-max 100]
                                  [--start 0] [--out docs/figures/memit_scaling.png] [--threads T]
                                  [--stats-samples N] [--set method.key=value ...] [--methods memit rome_seq]

MEMIT edits the first n CounterFact records (from --start) in one batch for each n in --counts, is scored
on those n records and restored. ROME applies the records one after another (edits accumulate, as in the
MEMIT paper's comparison) up to --rome-max and is scored on all records edited so far at each count.
Scores use the pipeline's evaluation functions (eval.scoring.score_requests + eval.metrics.summarize). The
one-time costs (model load, key statistics, context templates) are done before timing. Writes the plot, and
a markdown table and CSV with the same stem, next to --out, after every measured row (atomically); --resume
reads that CSV and skips the rows already measured, so an interrupted study continues where it stopped.
The two studies can run in parallel processes (`--methods memit` / `--methods rome_seq`, each with its own
--out); concatenate the CSVs and rerun with --resume to redraw the combined table and plot.
"""
from __future__ import annotations

import argparse
import csv
import io
import logging
import resource
import time
from pathlib import Path

import torch

from kedit_pl.config import REPO_ROOT, compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests
from kedit_pl.io import atomic_path, write_text
from kedit_pl.methods.base import EditMethod
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method

COLUMNS = ("method", "n_edits", "es", "ps", "ns", "score", "edit_seconds", "eval_seconds", "peak_rss_mb",
           "z_seconds", "z_cached", "z_residual", "s_per_edit")
# MEMIT: time spent optimizing z here, how many z came from the disk cache, and the share of the target shift
# ‖z − h‖ left unreached at the top layer after all layers were updated (0: the least squares fit every z).
# s_per_edit is derived (cold_seconds_per_edit), never read back.


def evaluate(method: EditMethod, requests: list[EditRequest], batch_size: int) -> tuple[dict[str, float], float]:
    """Summary metrics (percent) of `requests` under the method's current weights, and seconds taken."""
    start = time.perf_counter()
    records = score_requests(method.logits_fn(), method.tok, requests, batch_size,
                             next(method.model.parameters()).device)
    return summarize(records), time.perf_counter() - start


def editable(method: EditMethod, requests: list[EditRequest]) -> list[EditRequest]:
    """The requests the method can edit (ROME/MEMIT: subject locatable in every context); the rest are reported."""
    ok = []
    for req in requests:
        problem = method.request_problem(req)
        if problem is None:
            ok.append(req)
        else:
            print(f"skipping: {problem}", flush=True)
    return ok


def row(name: str, n: int, metrics: dict[str, float], edit_s: float, eval_s: float, info: dict | None = None) -> dict:
    info = info or {}
    return {"method": name, "n_edits": n, **{k: metrics.get(k, float("nan")) for k in ("es", "ps", "ns", "score")},
            "edit_seconds": edit_s, "eval_seconds": eval_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # process peak so far
            "z_seconds": info.get("value_seconds", float("nan")), "z_cached": info.get("values_cached", 0),
            "z_residual": info["final_z_error"] / info["layers"][0]["z_error"] if info.get("layers") else float("nan")}


def cold_seconds_per_edit(r: dict) -> float:
    """Edit seconds per edit as if every z had been computed in this run: z that came from the disk cache are
    priced at the per-z cost measured in the same row (NaN when every z was cached)."""
    n, cached, z_s = r["n_edits"], int(r.get("z_cached") or 0), r.get("z_seconds", float("nan"))
    if r["method"] == "unedited":
        return float("nan")
    if not cached:
        return r["edit_seconds"] / n
    if cached >= n:
        return float("nan")
    return (r["edit_seconds"] - z_s) / n + z_s / (n - cached)


def run_memit(memit: EditMethod, requests: list[EditRequest], counts: list[int], bs: int, record) -> None:
    """One batch edit per count, scored then restored."""
    for n in counts:
        start = time.perf_counter()
        handle = memit.apply(requests[:n])
        edit_s = time.perf_counter() - start
        try:
            metrics, eval_s = evaluate(memit, requests[:n], bs)
        finally:
            memit.restore(handle)
        record(row("memit", n, metrics, edit_s, eval_s, handle.info))


def run_rome_sequential(rome: EditMethod, requests: list[EditRequest], counts: list[int], bs: int, record) -> None:
    """Edits accumulate one record at a time; scored on all edited records at each count; restored at the end."""
    handles, edit_s = [], 0.0
    try:
        for n in counts:
            for req in requests[len(handles):n]:
                start = time.perf_counter()
                handles.append(rome.apply([req]))
                edit_s += time.perf_counter() - start
            metrics, eval_s = evaluate(rome, requests[:n], bs)
            record(row("rome_seq", n, metrics, edit_s, eval_s))
    finally:
        for h in reversed(handles):
            rome.restore(h)


def read_rows(csv_path: Path) -> list[dict]:
    """Rows of an earlier (possibly interrupted) run of this study."""
    if not csv_path.is_file():
        return []
    with csv_path.open() as f:
        return [{k: (v if k == "method" else int(v or 0) if k in ("n_edits", "z_cached") else float(v or "nan"))
                 for k, v in r.items()} for r in csv.DictReader(f)]


def write_outputs(rows: list[dict], out: Path, title: str) -> list[Path]:
    """CSV, markdown table and the plot (metrics and edit wall time vs number of edits), each atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**r, "s_per_edit": cold_seconds_per_edit(r)} for r in rows]
    csv_path, md_path = out.with_suffix(".csv"), out.with_suffix(".md")
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    write_text(csv_path, buf.getvalue())
    lines = [f"# {title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = [r.get(c, "") for c in COLUMNS]
        lines.append("| " + " | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in cells)
                     + " |")
    write_text(md_path, "\n".join(lines) + "\n")

    base = max((r for r in rows if r["method"] == "unedited"), key=lambda r: r["n_edits"], default=None)
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for ax, key, label in zip(axes, ("es", "ps", "ns", "score", "s_per_edit"),
                              ("ES", "PS", "NS", "Score", "edit seconds per edit")):
        for method, style in (("memit", "o-"), ("rome_seq", "s--")):
            pts = [(r["n_edits"], r[key]) for r in rows if r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), style, label=method)
        if base and key != "s_per_edit":
            ax.axhline(base[key], color="grey", ls=":", lw=1)
            ax.annotate(f"unedited (first {base['n_edits']})", (0.98, base[key]), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_xlabel("edits")
        ax.set_title(label)
        if key != "s_per_edit":
            ax.set_ylim(-2, 102)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return [out, md_path, csv_path]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000], help="MEMIT batch sizes")
    ap.add_argument("--rome-max", type=int, default=100, help="sequential ROME up to this many edits (0: skip)")
    ap.add_argument("--start", type=int, default=0, help="first record position in CounterFact")
    ap.add_argument("--out", default=str(REPO_ROOT / "docs" / "figures" / "memit_scaling.png"))
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--stats-samples", type=int, default=None, help="override stats.n_samples")
    ap.add_argument("--eval-batch-size", type=int, default=64)
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides, e.g. method.mom2_update_weight=1500")
    ap.add_argument("--resume", action="store_true", help="keep the rows of --out's CSV and measure only the rest")
    ap.add_argument("--fill-z-only", action="store_true",
                    help="only compute and cache MEMIT's z for the selected records, last first (a helper process "
                         "beside a running study with the same --start and largest count; see kv/value_cache.py)")
    ap.add_argument("--methods", nargs="+", choices=("memit", "rome_seq"), default=["memit", "rome_seq"],
                    help="which studies to run (e.g. rome_seq alone into another --out, merged later with --resume)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kedit_pl").setLevel(logging.INFO)  # z-cache progress of long MEMIT runs
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = sorted(set(args.counts))
    if "rome_seq" not in args.methods:
        args.rome_max = 0
    rome_counts = sorted({n for n in counts if n <= args.rome_max} | ({args.rome_max} if args.rome_max else set()))
    if "memit" not in args.methods:
        counts = []
    if not counts + rome_counts:
        ap.error("nothing to run: --methods rome_seq needs --rome-max > 0")
    n_max = max(counts + rome_counts)
    spare = n_max // 20 + 5  # records whose subject cannot be located are replaced by the next ones
    common = [f"model={args.model}", "paths.output_dir=/tmp/kedit_bench",
              f"dataset.range={args.start}:{args.start + n_max + spare}", "dataset.limit=null"] + ([f"stats.n_samples={args.stats_samples}"] if args.stats_samples else [])

    out = Path(args.out)
    title = f"MEMIT vs sequential ROME on {args.model} (CounterFact from #{args.start})"
    rows = read_rows(out.with_suffix(".csv")) if args.resume else []
    done = {(r["method"], r["n_edits"]) for r in rows}
    if rows:
        print(f"resuming: {len(rows)} rows already in {out.with_suffix('.csv')}", flush=True)

    def record(r: dict) -> None:
        rows.append(r)
        write_outputs(rows, out, title)
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)

    cfg = compose("edit", common + ["method=memit"] + [s for s in args.set if s.startswith("method.")])
    t0 = time.perf_counter()
    lm = load_model(cfg.model)
    requests = select(load_split(cfg.dataset.path, cfg.dataset.format), range_=cfg.dataset.range)
    print(f"{args.model}: load {time.perf_counter() - t0:.1f}s, {len(requests)} records, "
          f"{torch.get_num_threads()} threads", flush=True)
    memit = build_method(cfg, lm)
    t0 = time.perf_counter()
    memit.prepare()
    print(f"memit layers {memit.layers}: stats+templates {time.perf_counter() - t0:.1f}s", flush=True)
    requests = editable(memit, requests)[:n_max]
    if args.fill_z_only:
        res = memit.compute_targets(requests[::-1])
        print(f"z cache filled: {len(requests)} requests, {res.seconds:.0f} s computed here", flush=True)
        return
    if ("unedited", len(requests)) not in done:
        metrics, eval_s = evaluate(memit, requests, args.eval_batch_size)
        record(row("unedited", len(requests), metrics, 0.0, eval_s))
    run_memit(memit, requests, [n for n in counts if ("memit", n) not in done], args.eval_batch_size, record)
    if rome_counts and not all(("rome_seq", n) in done for n in rome_counts):
        rows[:] = [r for r in rows if r["method"] != "rome_seq"]  # edits accumulate: rerun the whole sequence
        rome = build_method(compose("edit", common + ["method=rome"]), lm)
        rome.prepare()
        run_rome_sequential(rome, requests, rome_counts, args.eval_batch_size, record)
    write_outputs(rows, out, title)  # also redraws a --resume run whose rows were all measured (or merged in)
    for p in (out, out.with_suffix(".md"), out.with_suffix(".csv")):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
