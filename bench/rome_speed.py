"""ROME speed: the value optimization in bf16 projections vs the fp32 fast path vs the plain full-forward loop.

    python bench/rome_speed.py [--model smollm2_135m] [--n 5] [--start 0] [--layer L] [--threads T]
                               [--stats-samples N] [--compute-dtype bfloat16] [--no-full] [--score]

Every path edits the same records (edit, measure, restore), one record at a time in this order: the new path
(`method.compute_dtype`, fast), the fp32 fast path (prefix cache, upper layers only: the code before this
option), the full-forward loop (fp32, every layer every step). Prints seconds per edit, the ratios, and how
each weight update differs from the fp32 fast path's: "max rel" = max|ΔW − ΔW_fp32| / max|ΔW_fp32| (the largest
entry difference over the largest entry), the cosine between the two updates and the ratio of their norms, and
the target NLL each path's optimization ended at. ΔW = Λ uᵀ is rank one with the same u = C⁻¹k* on every path
(the keys lie below the edit layer, computed in float32), so "max rel" is max|Λ − Λ_fp32| / max|Λ_fp32|: the
difference of the optimized values δ, i.e. of the end points of two 20-step Adam runs. `--score` also scores
every path's edited model with our scorer (ES / PS / NS), which is what decides whether a difference matters
(docs/scale.md). The one-time costs (model load, key statistics, context templates) are done first and
reported separately.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.eval import scoring
from kedit_pl.eval.metrics import summarize
from kedit_pl.methods.rome import ROME
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method


def edit_delta(rome: ROME, req, name: str, score: bool = False) -> tuple[torch.Tensor, float, int, float, dict | None]:
    """Apply one edit, return (ΔW, seconds, gradient steps, final target NLL, scores of the edited model or None)
    and restore the model."""
    w = dict(rome.model.named_parameters())[name]
    before = w.detach().clone()
    start = time.perf_counter()
    handle = rome.apply([req])
    seconds = time.perf_counter() - start
    delta = w.detach() - before
    rec = scoring.score_requests(scoring.model_logits(rome.model), rome.tok, [req])[0] if score else None
    rome.restore(handle)
    info = handle.info["per_request"][0]
    return delta, seconds, info["steps"] + 1, info["nll"], rec


def configure(rome: ROME, fast: bool, dtype: str) -> None:
    """Switch the path: fast (prefix cache) or full forward, and the value optimization's compute dtype."""
    rome.fast = fast
    rome.hp.pop("compute_dtype", None)
    if dtype != "float32":
        rome.hp["compute_dtype"] = dtype


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a − b| / max|b|: the largest entry difference over the largest entry of the reference."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-300)).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=5, help="records to edit")
    ap.add_argument("--start", type=int, default=0, help="first record position in CounterFact")
    ap.add_argument("--layer", type=int, default=None, help="edit layer (default: the model's rome default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stats-samples", type=int, default=None, help="override stats.n_samples")
    ap.add_argument("--compute-dtype", default="bfloat16", help="the new path's method.compute_dtype")
    ap.add_argument("--no-full", action="store_true", help="skip the full-forward loop (the slowest path)")
    ap.add_argument("--score", action="store_true", help="score each path's edited model (ES / PS / NS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(width=200)
    overrides = [f"model={args.model}", "method=rome", "paths.output_dir=/tmp/kedit_bench",
                 f"dataset.range={args.start}:{args.start + args.n}"]
    if args.layer is not None:
        overrides.append(f"method.layer={args.layer}")
    if args.stats_samples:
        overrides.append(f"stats.n_samples={args.stats_samples}")
    cfg = compose("edit", overrides)

    t0 = time.perf_counter()
    lm = load_model(cfg.model)
    t_load = time.perf_counter() - t0
    requests = select(load_split(cfg.dataset.path, cfg.dataset.format), range_=cfg.dataset.range)
    rome = build_method(cfg, lm)
    assert isinstance(rome, ROME)
    t0 = time.perf_counter()
    rome.prepare()
    t_prep = time.perf_counter() - t0
    name = rome.edited_parameters([])[0]
    console.print(f"{args.model} layer {rome.layer}: load {t_load:.1f}s, stats+templates {t_prep:.1f}s "
                  f"(cached after the first run), {torch.get_num_threads()} threads; new path: fast, "
                  f"compute_dtype={args.compute_dtype}")

    paths = {"new": (True, args.compute_dtype), "fast fp32": (True, "float32")}
    if not args.no_full:
        paths["full fp32"] = (False, "float32")
    secs: dict[str, list[float]] = {p: [] for p in paths}
    table = Table("case_id", *[f"{p} s" for p in paths], "fast/new", *(["full/new"] if not args.no_full else []),
                  "steps new/fp32", "NLL new/fp32", "ΔW new vs fast: max rel", "cos", "‖new‖/‖fp32‖",
                  *(["ΔW full vs fast: max rel"] if not args.no_full else []))
    diffs_new, diffs_full, coss = [], [], []
    recs: dict[str, list[dict]] = {p: [] for p in paths}
    for req in requests:
        deltas, steps, nll = {}, {}, {}
        for p, (fast, dtype) in paths.items():
            configure(rome, fast, dtype)
            deltas[p], s, steps[p], nll[p], rec = edit_delta(rome, req, name, args.score)
            secs[p].append(s)
            if rec is not None:
                recs[p].append(rec)
        d_new, d_full = rel(deltas["new"], deltas["fast fp32"]), None
        diffs_new.append(d_new)
        coss.append(cos(deltas["new"], deltas["fast fp32"]))
        cells = [f"{secs[p][-1]:.2f}" for p in paths] + [f"{secs['fast fp32'][-1] / secs['new'][-1]:.2f}x"]
        if not args.no_full:
            d_full = rel(deltas["full fp32"], deltas["fast fp32"])
            diffs_full.append(d_full)
            cells.append(f"{secs['full fp32'][-1] / secs['new'][-1]:.2f}x")
        cells += [f"{steps['new']}/{steps['fast fp32']}", f"{nll['new']:.3f}/{nll['fast fp32']:.3f}", f"{d_new:.2e}",
                  f"{coss[-1]:.4f}", f"{(deltas['new'].norm() / deltas['fast fp32'].norm()).item():.3f}"]
        cells += [f"{d_full:.2e}"] if d_full is not None else []
        table.add_row(str(req.case_id), *cells)
        console.print(f"case {req.case_id}: " + "  ".join(f"{p} {secs[p][-1]:.2f}s" for p in paths))
    configure(rome, True, "float32")
    med = {p: statistics.median(v) for p, v in secs.items()}
    table.add_row("median", *[f"{med[p]:.2f}" for p in paths], f"{med['fast fp32'] / med['new']:.2f}x",
                  *([f"{med['full fp32'] / med['new']:.2f}x"] if not args.no_full else []), "", "", "", "", "",
                  *([""] if not args.no_full else []))
    console.print(table)
    if args.score:
        quality = Table("path", "ES", "PS", "NS", "Score", title=f"edited models, our scorer, {len(requests)} records")
        for p in paths:
            m = summarize(recs[p])
            quality.add_row(p, *[f"{m[k]:.1f}" for k in ("es", "ps", "ns", "score")])
        console.print(quality)
    console.print("seconds per edit (median): " + "  ".join(f"{p} {med[p]:.2f}" for p in paths)
                  + f"; new path {med['fast fp32'] / med['new']:.2f}x the fp32 fast path"
                  + (f", {med['full fp32'] / med['new']:.2f}x the full-forward loop" if not args.no_full else "")
                  + f"; ΔW new vs fp32 fast: max rel diff {max(diffs_new):.2e}, lowest cosine {min(coss):.4f}")


if __name__ == "__main__":
    main()
