"""MEMIT z speed: seconds per z_i (eq. 16) with the value optimization in bf16 projections vs fp32.

    python bench/memit_z_speed.py [--model smollm2_135m] [--n 32] [--start 0] [--rounds 1] [--threads T]
                                  [--compute-dtype bfloat16] [--method memit]

Optimizes the targets z_i of the first n editable CounterFact records (one z batch of `method.z_batch_size`
requests at the default n = 32) with each compute dtype, the z disk cache off, `rounds` times in alternation
(fp32, new, fp32, new, ...), and prints the seconds per z, the ratio, the mean gradient steps per z, the final
NLLs and the relative difference of the z vectors. Templates are made before timing.
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
from kedit_pl.kv.values import ValueResult
from kedit_pl.methods.memit import MEMIT
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method


def targets(memit: MEMIT, requests, dtype: str) -> tuple[ValueResult, float]:
    memit.hp.pop("compute_dtype", None)
    if dtype != "float32":
        memit.hp["compute_dtype"] = dtype
    start = time.perf_counter()
    res = memit.compute_targets(requests)
    return res, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--method", default="memit", help="any method of the MEMIT family (same z)")
    ap.add_argument("--n", type=int, default=32, help="requests")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="alternating repetitions of the two dtypes")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compute-dtype", default="bfloat16", help="the new path's method.compute_dtype")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    cfg = compose("edit", [f"model={args.model}", f"method={args.method}", "paths.output_dir=/tmp/kedit_bench",
                           "method.z_cache=false", f"dataset.range={args.start}:{args.start + 2 * args.n + 10}"])
    lm = load_model(cfg.model)
    memit = build_method(cfg, lm)
    assert isinstance(memit, MEMIT)
    memit.templates()
    requests = [r for r in select(load_split(cfg.dataset.path, cfg.dataset.format), range_=cfg.dataset.range)
                if memit.request_problem(r) is None][: args.n]
    console.print(f"{args.model} {args.method}: z at layer {memit.layer}, {len(requests)} requests, "
                  f"z_batch_size {memit.z_batch_size}, {torch.get_num_threads()} threads")
    dtypes = ["float32", args.compute_dtype]
    secs: dict[str, list[float]] = {d: [] for d in dtypes}
    last: dict[str, ValueResult] = {}
    for r in range(args.rounds):
        for d in dtypes:
            last[d], s = targets(memit, requests, d)
            secs[d].append(s)
            console.print(f"round {r}: {d} {s:.1f}s ({s / len(requests):.2f} s per z)")
    ref, new = last["float32"], last[args.compute_dtype]
    z_rel = ((new.target - ref.target).norm(dim=-1) / ref.target.norm(dim=-1))
    d_rel = ((new.delta - ref.delta).norm(dim=-1) / ref.delta.norm(dim=-1).clamp_min(1e-12))
    table = Table("compute dtype", "s per z (median)", "ratio", "mean steps", "mean final NLL", "max final NLL")
    for d in dtypes:
        res = last[d]
        table.add_row(d, f"{statistics.median(secs[d]) / len(requests):.3f}",
                      f"{statistics.median(secs['float32']) / statistics.median(secs[d]):.2f}x",
                      f"{sum(s + 1 for s in res.steps) / len(res.steps):.2f}", f"{res.nll.mean():.4f}",
                      f"{res.nll.max():.4f}")
    console.print(table)
    console.print(f"z = v + δ: relative difference new vs fp32 median {z_rel.median():.2e}, max {z_rel.max():.2e}; "
                  f"δ alone median {d_rel.median():.2e}, max {d_rel.max():.2e}")


if __name__ == "__main__":
    main()
