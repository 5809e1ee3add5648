"""Where a ROME edit's time goes: phases of one edit, the value (v*) loop's steps, and its top operators.

    python bench/rome_profile.py [--model smollm2_135m] [--n 3] [--start 0] [--threads 1]
                                 [--compute-dtype bfloat16]

For each record, one edit is timed by phase (wrapping the functions that do the work, no change to them):
v* prepare (prefix key/value cache, the edit block's cached input, and the keys k(x_j + s) read in the same
pass), v* steps split into forward (`hidden`), loss (LM head, log-softmax, KL), backward and Adam + clamp, the
C⁻¹k solve and the rest of the rank-one update. Then one more edit runs under torch.profiler: the top operators by self CPU time,
the matmul FLOPs and the achieved GFLOP/s, and the share of the wall time spent outside aten operators
(Python, autograd and dispatch overhead). Rows and tokens of the v* batch (rewrite rows, the KL row, suffix
lengths) are printed too.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.kv import values
from kedit_pl.methods import rome as rome_mod
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method

PHASES = {  # label -> (owner, attribute) of the wrapped function
    "v* prepare (prefix cache)": (values._FastRunner, "prepare"),
    "v* step: forward": (values._FastRunner, "hidden"),
    "v* step: LM head + loss": (values, "_logprobs"),
    "v* step: backward": (torch.Tensor, "backward"),
    "v* step: Adam + clamp": (torch.optim.Adam, "step"),
    "C⁻¹k solve": (rome_mod.CovarianceSolver, "solve"),
    "rank-one update": (rome_mod, "rank_one_update"),
}


@contextmanager
def timed_phases(acc: dict[str, float], calls: dict[str, int]) -> Iterator[None]:
    """Wrap each PHASES function with a wall-clock timer (restored on exit)."""
    saved = []
    for label, (owner, attr) in PHASES.items():
        fn = getattr(owner, attr)
        saved.append((owner, attr, owner.__dict__[attr]))

        def wrapped(*a, _fn=fn, _label=label, **k):
            t = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                acc[_label] += time.perf_counter() - t
                calls[_label] += 1
        setattr(owner, attr, wrapped)
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def batch_shape(rome, req) -> str:
    b = values.build_batch(rome.tok, [req], rome.templates())
    run = values._FastRunner(rome.model, rome.spec, b, rome.layer, "mlp_out", rome.loss_layer or rome.spec.n_layers - 1)
    pre, suf = run.prefix["attention_mask"].sum(1), run.suffix["input_ids"].shape[1]
    n_rw = len(b.row_req) - len(b.kl_rows)
    real = int(run.suffix["attention_mask"][:, pre.shape[0] and run.prefix["attention_mask"].shape[1]:].sum())
    return (f"{n_rw} rewrite rows + {len(b.kl_rows)} KL row(s); suffix width {suf} tokens "
            f"({real} real of {len(b.row_req) * suf}); prefix {int(pre.min())}-{int(pre.max())} tokens cached")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compute-dtype", default="bfloat16", help="method.compute_dtype of the profiled edits")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=200)
    cfg = compose("edit", [f"model={args.model}", "method=rome", "paths.output_dir=/tmp/kedit_bench",
                           f"dataset.range={args.start}:{args.start + args.n + 1}",
                           f"method.compute_dtype={args.compute_dtype}"])
    lm = load_model(cfg.model)
    requests = select(load_split(cfg.dataset.path, cfg.dataset.format), range_=cfg.dataset.range)
    rome = build_method(cfg, lm)
    rome.prepare()
    acc: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    total, steps = 0.0, []
    for req in requests[:args.n]:
        console.print(f"case {req.case_id}: {batch_shape(rome, req)}")
        with timed_phases(acc, calls):
            t = time.perf_counter()
            handle = rome.apply([req])
            total += time.perf_counter() - t
        steps.append(handle.info["per_request"][0]["steps"] + 1)
        rome.restore(handle)
    table = Table("phase", "s / edit", "share", "calls / edit", title=f"ROME edit phases, {args.model}, "
                  f"compute_dtype={args.compute_dtype}, {args.n} edits, {args.threads} thread(s); "
                  f"gradient steps per edit: {steps}")
    for label in PHASES:
        table.add_row(label, f"{acc[label] / args.n:.3f}", f"{100 * acc[label] / total:.1f}%",
                      f"{calls[label] / args.n:.0f}")
    rest = total - sum(acc.values())
    table.add_row("other (batch building, hooks, loop)", f"{rest / args.n:.3f}", f"{100 * rest / total:.1f}%", "")
    table.add_row("total", f"{total / args.n:.3f}", "100%", "")
    console.print(table)

    req = requests[args.n]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
        t = time.perf_counter()
        handle = rome.apply([req])
        wall = time.perf_counter() - t
    rome.restore(handle)
    ev = prof.key_averages()
    console.print(ev.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))
    aten = sum(e.self_cpu_time_total for e in ev if e.key.startswith("aten::")) / 1e6
    flops = sum(e.flops for e in ev)
    mm = sum(e.self_cpu_time_total for e in ev if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul",
                                                             "aten::linear")) / 1e6
    console.print(f"profiled edit (case {req.case_id}): wall {wall:.2f} s under the profiler; aten operators "
                  f"{aten:.2f} s ({100 * aten / wall:.0f}%), of which matmuls {mm:.2f} s; outside aten (Python, "
                  f"autograd, dispatch, profiler) {wall - aten:.2f} s; {flops / 1e9:.1f} GFLOP counted, "
                  f"{flops / 1e9 / max(mm, 1e-9):.1f} GFLOP/s in matmuls")


if __name__ == "__main__":
    main()
