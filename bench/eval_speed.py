"""Evaluation speed: today's scoring against prompt-cache scoring with cached pre-edit scores, same records, same run.

    python bench/eval_speed.py [--model smollm2_135m] [--n 100] [--post-batch 1] [--threads 1]

A run's scoring is a pre pass over all N records on the unedited model, then a post pass per edit batch
(`--post-batch` records each; 1 = the single-edit protocol). Edits change no cost, so the post passes score the
unedited model too. Three ways, timed one after the other in this process:
- old: one forward per (prompt, target) pair (`score_pairs_full`), for pre and post;
- new, first run: one pass per distinct prompt + continuations from its KV cache; pre scores written to an
  empty cache (the weights digest and the writes are counted);
- new, cached: the same, with the pre scores read back from that cache.
Prints seconds and old/new ratios, and the largest |NLL| difference between old and new scores.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--post-batch", type=int, default=1, help="records per post pass (1 = single-edit protocol)")
    ap.add_argument("--batch-size", type=int, default=64, help="eval batch size (edit.eval_batch_size)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
