"""ROME speed: the fast upper-layers value optimization vs the plain full-forward loop, on the same records.

    python bench/rome_speed.py [--model smollm2_135m] [--n 5] [--start 0] [--layer L] [--threads T]
                               [--stats-samples N]

Both paths edit the same records (edit, measure, restore). Prints seconds per edit for each, the speed ratio
and the max relative difference between the two resulting weight updates. The one-time costs (model load,
key statistics, context templates) are done first and reported separately.
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.methods.rome import ROME
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method


def edit_delta(rome: ROME, req, name: str) -> tuple[torch.Tensor, float]:
    """Apply one edit, return (ΔW, seconds) and restore the model."""
    w = dict(rome.model.named_parameters())[name]
    before = w.detach().clone()
    start = time.perf_counter()
    handle = rome.apply([req])
    seconds = time.perf_counter() - start
    delta = w.detach() - before
    rome.restore(handle)
    return delta, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=5, help="records to edit")
    ap.add_argument("--start", type=int, default=0, help="first record position in CounterFact")
    ap.add_argument("--layer", type=int, default=None, help="edit layer (default: the model's rome default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stats-samples", type=int, default=None, help="override stats.n_samples")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
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
                  f"(cached after the first run), {torch.get_num_threads()} threads")

    table = Table("case_id", "fast s", "full s", "ratio", "max rel diff ΔW")
    fast_s, full_s, diffs = [], [], []
    for req in requests:
        rome.fast = True
        d_fast, s_fast = edit_delta(rome, req, name)
        rome.fast = False
        d_full, s_full = edit_delta(rome, req, name)
        rel = ((d_fast - d_full).abs().max() / d_full.abs().max().clamp_min(1e-30)).item()
        fast_s.append(s_fast), full_s.append(s_full), diffs.append(rel)
        table.add_row(req.case_id, f"{s_fast:.2f}", f"{s_full:.2f}", f"{s_full / s_fast:.2f}x", f"{rel:.2e}")
        console.print(f"case {req.case_id}: fast {s_fast:.2f}s full {s_full:.2f}s rel diff {rel:.2e}")
    rome.fast = True
    console.print(table)
    mf, mu = sum(fast_s) / len(fast_s), sum(full_s) / len(full_s)
    console.print(f"seconds per edit: fast {mf:.2f}  full {mu:.2f}  speed-up {mu / mf:.2f}x  "
                  f"max rel diff {max(diffs):.2e}")


if __name__ == "__main__":
    main()
