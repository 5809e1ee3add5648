"""Knowledge-neuron attribution speed: the prefix-cache batched path vs the plain full-sequence computation.

    python bench/kn_speed.py [--model smollm2_135m] [--facts 1] [--batch-rows 200 600]

Both paths attribute the same facts (bag of prompts, all layers, m steps) in this process; prints s/fact, the
speed-up ratio and the largest score difference (they compute the same integrated gradients).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--facts", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-rows", type=int, nargs="+", default=[200])
    ap.add_argument("--no-plain", action="store_true", help="skip the (slower) plain baseline")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from kedit_pl.config import compose
    from kedit_pl.data.readers import read_requests
    from kedit_pl.locate.knowledge_neurons import NeuronAttributor, bag_prompts
    from kedit_pl.models.load import load_model

    cfg = compose("edit", [f"model={args.model}", "paths.output_dir=/tmp"])
    lm = load_model(cfg.model)
    reqs = [r for r, _ in read_requests("counterfact", cfg.dataset.path)[: args.facts]]
    runs = [(f"prefix cache, batch_rows={b}", True, b) for b in args.batch_rows]
    if not args.no_plain:
        runs.append((f"plain full sequence, batch_rows={args.batch_rows[0]}", False, args.batch_rows[0]))
    results = {}
    for label, cache, rows in runs:
        att = NeuronAttributor(lm.model, lm.tokenizer, lm.spec, steps=args.steps, batch_rows=rows, prefix_cache=cache)
        start = time.perf_counter()
        scores = [att.attribute(p, r.target_true).scores for r in reqs for p in bag_prompts(r)]
        results[label] = (time.perf_counter() - start) / len(reqs), scores
        print(f"{label}: {results[label][0]:.1f} s/fact ({len(scores)} prompts, {lm.spec.n_layers} layers, "
              f"m={args.steps})", flush=True)
    base_label = runs[-1][0]
    base_t, base_s = results[base_label]
    for label, (t, s) in results.items():
        diff = max((a - b).abs().max().item() for a, b in zip(s, base_s))
        print(f"{label}: {base_t / t:.2f}x vs {base_label}; max |score diff| {diff:.2e}")


if __name__ == "__main__":
    main()
