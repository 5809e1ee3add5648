"""Evaluation speed: today's scoring against prompt-cache scoring with cached pre-edit scores, same records, same run;
with --groups, every metric group of `eval=full`, one record at a time against shared forwards.

    python bench/eval_speed.py [--model smollm2_135m] [--n 100] [--post-batch 1] [--threads 1]
    python bench/eval_speed.py --groups [--method rome] [--n 16] [--states-per-forward 16] [--no-prefix-store]

A run's scoring is a pre pass over all N records on the unedited model, then a post pass per edit batch
(`--post-batch` records each; 1 = the single-edit protocol). Edits change no cost, so the post passes score the
unedited model too. Three ways, timed one after the other in this process:
- old: one forward per (prompt, target) pair (`score_pairs_full`), for pre and post;
- new, first run: one pass per distinct prompt + continuations from its KV cache; pre scores written to an
  empty cache (the weights digest and the writes are counted);
- new, cached: the same, with the pre scores read back from that cache.
Prints seconds and old/new ratios, and the largest |NLL| difference between old and new scores.

--groups: the post-edit evaluation of the single-edit protocol, per metric group, on the first n CounterFact-plus
test records that have generation prompts. Each record gets a real edit by `--method` (default ROME at the
model's default layer; the edits are made twice, once per path, and not timed). Old: per record, every group
measured on the edited system right after its edit, as the callback did before shared forwards. New: ES/PS/NS
and the scored groups the same way; fluency for up to `--states-per-forward` records in shared batched forwards
after the undo (eval/row_states.py), and long shared prefixes (IKE's demonstrations) read once per store as the
callback keeps them (scoring.PrefixStore; `--no-prefix-store`: off). General ability (perplexity) is a
per-state cost that both paths pay on the first `eval.general.single_records` records; it is timed once and shown
per state. Prints seconds per record per group, the ratio, and whether every value is identical.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.data.splits import apply_split
from kedit_pl.eval import scoring
from kedit_pl.eval.pre_cache import cached_pre_scores
from kedit_pl.models.load import load_model


def score_old(fn, tok, requests, batch_size, device):
    """`score_requests` as it was: every (prompt, target) pair its own row."""
    old = scoring.score_pairs
    scoring.score_pairs = scoring.score_pairs_full
    try:
        return scoring.score_requests(fn, tok, requests, batch_size, device)
    finally:
        scoring.score_pairs = old


def timed_run(pre: Callable[[list], list[dict]], post: Callable[[list], list[dict]], requests: list,
              post_batch: int) -> tuple[float, float, list[dict], list[dict]]:
    """(pre seconds, post seconds, pre records, post records) of one run's scoring."""
    t0 = time.perf_counter()
    pre_recs = pre(requests)
    t1 = time.perf_counter()
    post_recs = [r for s in range(0, len(requests), post_batch) for r in post(requests[s:s + post_batch])]
    return t1 - t0, time.perf_counter() - t1, pre_recs, post_recs


def max_nll_gap(a: list[dict], b: list[dict]) -> float:
    gap = 0.0
    for ra, rb in zip(a, b):
        for group, kinds in ra.items():
            if group == "case_id":
                continue
            for kind, scores in kinds.items():
                for sa, sb in zip(scores, rb[group][kind]):
                    gap = max(gap, abs(sa["nll"] - sb["nll"]))
    return gap


def largest_gap(a, b) -> float:
    """Largest |difference| between the numbers of two records of the same layout; inf where anything else (a
    generation, a key, a length) differs."""
    if isinstance(a, dict) and isinstance(b, dict):
        return max((largest_gap(a[k], b[k]) for k in a), default=0.0) if a.keys() == b.keys() else float("inf")
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return max((largest_gap(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b))
    return 0.0 if a == b else float("inf")


def groups_bench(args) -> None:
    """Old (one record at a time) against new (shared forwards) post-edit evaluation, per metric group."""
    from kedit_pl.eval.groups import GroupRunner, build_groups
    from kedit_pl.eval.row_states import capture, edited_state
    from kedit_pl.pipeline import build_method

    cfg = compose("edit", [f"model={args.model}", f"method={args.method}", "eval=full", "dataset=counterfact_plus",
                           "dataset.split=test", "paths.output_dir=/tmp/eval_speed"])
    method = build_method(cfg)
    method.model.eval()
    test = apply_split(load_split(cfg.dataset.path, cfg.dataset.format), "test", cfg.dataset.split_rule)
    reqs = [r for r in test if r.generation_prompts][:args.n]
    settings = dict(cfg.eval)
    groups = build_groups([g for g in cfg.eval.metrics if g != "general"], settings)
    general = build_groups(["es_ps_ns", "general"], settings)[0]
    names = ["es_ps_ns"] + [g.name for g in groups]
    old_t, new_t = dict.fromkeys(names + ["general"], 0.0), dict.fromkeys(names, 0.0)
    bs = int(cfg.edit.eval_batch_size)
    shared = tuple(GroupRunner(groups).shared_forward())

    def measure(req, timing, skip=()):
        """ES/PS/NS and the groups not in `skip`, on the method's current (edited) system, each timed."""
        t = time.perf_counter()
        rec = scoring.score_requests(method.logits_fn(), method.tok, [req], bs, "cpu")[0]
        timing["es_ps_ns"] += time.perf_counter() - t
        for g in groups:
            if g.name not in skip:
                t = time.perf_counter()
                GroupRunner([g]).measure(method, [req], [rec])
                timing[g.name] += time.perf_counter() - t
        return rec

    old_recs, new_recs, systems = [], [], []
    for r in reqs:  # old: every group right after the edit (the edits themselves are not timed)
        handle = method.apply([r])
        old_recs.append(measure(r, old_t))
        method.restore(handle)
    with torch.no_grad():  # one state of perplexity (what each of the first single_records edits costs)
        t = time.perf_counter()
        GroupRunner([general]).measure(method, reqs[:1], [{}])
        old_t["general"] = time.perf_counter() - t
    runner = GroupRunner(groups)
    run_store = scoring.PrefixStore() if getattr(method, "fixed_routes", False) else None

    def prefixes():
        """As the callback keeps them: one store per run for fixed routes (IKE, SERAC), else per edited state."""
        return None if args.no_prefix_store else run_store or scoring.PrefixStore()

    for s0 in range(0, len(reqs), args.states_per_forward):  # new: shared forwards after the undo
        part = reqs[s0:s0 + args.states_per_forward]
        recs, systems = [], []
        for r in part:
            handle = method.apply([r])
            systems.append(capture(method, edited_state(method.model, handle), runner.shared_prompts(r)))
            with scoring.reuse_prefixes(prefixes()):
                recs.append(measure(r, new_t, skip=shared if systems[-1] is not None else ()))
            method.restore(handle)
        if all(st is not None for st in systems):
            t = time.perf_counter()
            with scoring.reuse_prefixes(prefixes()):
                runner.measure_states(method, part, recs, systems)
            for name in shared:
                new_t[name] += (time.perf_counter() - t) / len(shared)
        new_recs += recs
    same = sum(a == b for a, b in zip(old_recs, new_recs))
    n = len(reqs)
    table = Table(title=f"post-edit evaluation per record, eval=full, {n} CounterFact-plus test records, "
                        f"{args.method} edits, {args.model}, {args.threads} thread(s), {args.states_per_forward} "
                        f"states per forward")
    for col in ("group", "old s/record", "new s/record", "old / new"):
        table.add_column(col)
    for name in names:
        ratio = f"{old_t[name] / new_t[name]:.2f}" if new_t[name] else ""
        table.add_row(name, f"{old_t[name] / n:.2f}", f"{new_t[name] / n:.2f}", ratio)
    total_old, total_new = sum(old_t[k] for k in names) / n, sum(new_t.values()) / n
    table.add_row("total", f"{total_old:.2f}", f"{total_new:.2f}", f"{total_old / total_new:.2f}")
    table.add_row("general (per measured state)", f"{old_t['general']:.2f}", f"{old_t['general']:.2f}", "1.00")
    Console().print(table)
    gap = max((largest_gap(a, b) for a, b in zip(old_recs, new_recs)), default=0.0)
    print(f"records with identical values (scores, generations, entropies): {same}/{n}; largest difference of a "
          f"number: {gap:.2e} (inf: a generation or a layout differs)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--post-batch", type=int, default=1, help="records per post pass (1 = single-edit protocol)")
    ap.add_argument("--batch-size", type=int, default=64, help="eval batch size (edit.eval_batch_size)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--groups", action="store_true", help="time every metric group, one record vs shared forwards")
    ap.add_argument("--states-per-forward", type=int, default=16, help="--groups: edited states per shared forward")
    ap.add_argument("--method", default="rome", help="--groups: the editing method (its config name)")
    ap.add_argument("--no-prefix-store", action="store_true",
                    help="--groups: the new path without the prefix store (eval.prefix_cache_mb=0)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.groups:
        return groups_bench(args)
    cfg = compose("edit", [f"model={args.model}", "paths.output_dir=/tmp/eval_speed"])
    lm = load_model(cfg.model)
    lm.model.eval()
    tok, bs = lm.tokenizer, args.batch_size
    requests = select(load_split(cfg.dataset.path, "counterfact"), limit=args.start + args.n)[args.start:]
    fn = scoring.model_logits(lm.model)
    old = lambda reqs: score_old(fn, tok, reqs, bs, "cpu")  # noqa: E731
    new = lambda reqs: scoring.score_requests(fn, tok, reqs, bs, "cpu")  # noqa: E731
    with tempfile.TemporaryDirectory() as root:
        cached = lambda reqs: cached_pre_scores(root, fn, tok, reqs, bs, "cpu")  # noqa: E731
        runs = {"old (pair per row)": timed_run(old, old, requests, args.post_batch),
                "new, first run": timed_run(cached, new, requests, args.post_batch),
                "new, pre cached": timed_run(cached, new, requests, args.post_batch)}
    base = sum(runs["old (pair per row)"][:2])
    table = Table(title=f"scoring {len(requests)} CounterFact records, {args.model}, post batches of "
                        f"{args.post_batch}, {args.threads} thread(s)")
    for col in ("way", "pre s", "post s", "total s", "old / this", "max |Δ nll| vs old"):
        table.add_column(col)
    ref = runs["old (pair per row)"]
    for name, (t_pre, t_post, pre_recs, post_recs) in runs.items():
        gap = max(max_nll_gap(pre_recs, ref[2]), max_nll_gap(post_recs, ref[3]))
        table.add_row(name, f"{t_pre:.1f}", f"{t_post:.1f}", f"{t_pre + t_post:.1f}", f"{base / (t_pre + t_post):.2f}",
                      f"{gap:.1e}")
    Console().print(table)


if __name__ == "__main__":
    main()
