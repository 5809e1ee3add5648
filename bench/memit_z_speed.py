"""MEMIT speed by part, old against new in one run: the z optimization (eq. 16) and the per-layer reads (keys,
block outputs) that the layer solves (eq. 14) need.

    python bench/memit_z_speed.py [--model smollm2_135m] [--n 32] [--start 0] [--rounds 1] [--threads T]
                                  [--compute-dtype bfloat16] [--method memit]
                                  [--z-batch OLD NEW] [--parts z keys] [--fp32]

z: optimizes the targets z_i of the first n editable CounterFact records with the z disk cache off, the old
setting (`method.z_batch_size` OLD) and the new one (NEW), both in `--compute-dtype`, `rounds` times in
alternation (old, new, old, new, ...), and prints the seconds per z, the old / new ratio (both measured in this
run), the mean gradient steps per z, the final NLLs and the relative difference of the z vectors. `--fp32` adds the
exact float32 path as a third row (2-3x slower). Templates are made before timing.

keys: for each layer of the range, low to high (MEMIT Algorithm 1), reads the keys K (n, d_k) and the block
outputs H, M the update needs, then adds a small fixed random update to that layer's MLP output weight (what the
solve would do; the time does not depend on its values), old = full passes (`compute_keys`, `block_outputs`),
new = `LayerKeys` (kept inputs of the lowest changing block), and prints seconds, the ratio and the largest
relative difference of K and H. The weights are restored after each path.
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
from kedit_pl.kv.keys import LayerKeys, compute_keys
from kedit_pl.kv.values import ValueResult
from kedit_pl.methods.memit import MEMIT, block_outputs
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method


def targets(memit: MEMIT, requests, dtype: str, z_batch: int) -> tuple[ValueResult, float]:
    memit.hp["compute_dtype"] = dtype
    memit.z_batch_size = z_batch
    start = time.perf_counter()
    res = memit.compute_targets(requests)
    return res, time.perf_counter() - start


def layer_reads(memit: MEMIT, requests, new: bool) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Keys and block-L outputs per layer with a fixed random update after each layer; weights restored."""
    model, spec = memit.model, memit.spec
    params = dict(model.named_parameters())
    names = [spec.weight_name("mlp_out", layer) for layer in memit.layers]
    saved = {n: params[n].detach().clone() for n in names}
    g = torch.Generator().manual_seed(0)
    Ks, Hs = [], []
    start = time.perf_counter()
    try:
        lk = LayerKeys(model, memit.tok, spec, requests, memit.templates()) if new else None
        for layer, name in zip(memit.layers, names):
            also = [spec.module_name("mlp_out", layer)]
            if new:
                K = lk.keys(layer, memit.key_groups)
                H, _M = lk.outputs(memit.layer, also)
            else:
                K = compute_keys(model, memit.tok, spec, layer, requests, memit.templates(), groups=memit.key_groups)
                H, _M = block_outputs(model, memit.tok, spec, memit.layer, requests, also=also)
            Ks.append(K), Hs.append(H)
            with torch.no_grad():
                W = params[name]
                W.add_(0.05 * W.abs().mean() * torch.randn(W.shape, generator=g))
        Hs.append(lk.outputs(memit.layer) if new else block_outputs(model, memit.tok, spec, memit.layer, requests))
        return Ks, Hs, time.perf_counter() - start
    finally:
        with torch.no_grad():
            for n in names:
                params[n].copy_(saved[n])


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)).max().item() for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--method", default="memit", help="any method of the MEMIT family (same z)")
    ap.add_argument("--n", type=int, default=32, help="requests")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1, help="alternating repetitions of old and new")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--compute-dtype", default="bfloat16", help="method.compute_dtype of old and new")
    ap.add_argument("--z-batch", type=int, nargs=2, default=None, metavar=("OLD", "NEW"),
                    help="method.z_batch_size of the old and the new z path (default: the config's for both)")
    ap.add_argument("--parts", nargs="+", choices=["z", "keys"], default=["z", "keys"])
    ap.add_argument("--fp32", action="store_true", help="also time the float32 z path (old z_batch_size)")
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
    memit.warm_values()
    requests = [r for r in select(load_split(cfg.dataset.path, cfg.dataset.format), range_=cfg.dataset.range)
                if memit.request_problem(r) is None][: args.n]
    old_b, new_b = args.z_batch or (memit.z_batch_size, memit.z_batch_size)
    console.print(f"{args.model} {args.method}: z at layer {memit.layer}, layers {memit.layers}, {len(requests)} "
                  f"requests, {torch.get_num_threads()} threads")
    if "keys" in args.parts:
        secs = {"old": [], "new": []}
        out = {}
        for r in range(args.rounds):
            for way in ("old", "new"):
                Ks, Hs, s = layer_reads(memit, requests, way == "new")
                out[way] = (Ks, Hs)
                secs[way].append(s)
                console.print(f"round {r}: reads {way} {s:.1f}s")
        table = Table("layer reads (keys K, outputs H, M)", "s", "old / new")
        for way, label in (("old", "old: full passes per layer"), ("new", "new: LayerKeys (kept block inputs)")):
            table.add_row(label, f"{statistics.median(secs[way]):.1f}",
                          f"{statistics.median(secs['old']) / statistics.median(secs[way]):.2f}x")
        console.print(table)
        console.print(f"max relative difference new vs old: K {rel(out['new'][0], out['old'][0]):.2e}, "
                      f"H {rel(out['new'][1], out['old'][1]):.2e}")
    if "z" in args.parts:
        ways = {"old": (args.compute_dtype, old_b), "new": (args.compute_dtype, new_b)}
        if args.fp32:
            ways["float32"] = ("float32", old_b)
        secs = {w: [] for w in ways}
        last: dict[str, ValueResult] = {}
        for r in range(args.rounds):
            for w, (dtype, zb) in ways.items():
                last[w], s = targets(memit, requests, dtype, zb)
                secs[w].append(s)
                console.print(f"round {r}: z {w} ({dtype}, z_batch_size {zb}) {s:.1f}s ({s / len(requests):.2f} s per z)")
        table = Table("z path", "compute dtype", "z_batch_size", "s per z (median)", "old / this", "mean steps",
                      "mean final NLL", "max final NLL")
        for w, (dtype, zb) in ways.items():
            res = last[w]
            table.add_row(w, dtype, str(zb), f"{statistics.median(secs[w]) / len(requests):.3f}",
                          f"{statistics.median(secs['old']) / statistics.median(secs[w]):.2f}x",
                          f"{sum(s + 1 for s in res.steps) / len(res.steps):.2f}", f"{res.nll.mean():.4f}",
                          f"{res.nll.max():.4f}")
        console.print(table)
        ref = last["old"]
        for w in [w for w in ways if w != "old"]:
            z_rel = (last[w].target - ref.target).norm(dim=-1) / ref.target.norm(dim=-1)
            d_rel = (last[w].delta - ref.delta).norm(dim=-1) / ref.delta.norm(dim=-1).clamp_min(1e-12)
            console.print(f"z = v + δ, {w} vs old: relative difference median {z_rel.median():.2e}, max "
                          f"{z_rel.max():.2e}; δ alone median {d_rel.median():.2e}, max {d_rel.max():.2e}")


if __name__ == "__main__":
    main()
