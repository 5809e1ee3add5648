"""Greedy decoding steps with long prompts: what the key/value cache layout costs per step, same process.

    python bench/decode_step.py [--model smollm2_135m] [--prefix 1000] [--steps 60] [--threads 1] [--reps 2]

Three layouts, each timed both ways (random token ids; the prompt pass is not timed, only the decoding steps):
- 10 rows behind one shared prefix of `--prefix` tokens (one IKE record's fluency prompts): DynamicLayer's
  concatenation of the whole cache at every step against `ReservedLayer`'s in-place writes;
- 160 rows of 12-token prompts (the shared-forward fluency batch of 16 ROME records): the same two;
- 4 records × 10 rows, each record behind its own prefix: a batch per record (4 × 10 rows, as the shared forwards
  ran IKE before) against one batch of 40 rows whose 4 prefixes are left-padded to the longest (`prefill`'s
  prefix groups), both with reserved layers. Also checks that both give the same tokens.
Prints milliseconds per decoding step (the best of `--reps`) and the ratios.
"""
from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.eval import generate
from kedit_pl.eval.scoring import prefill
from kedit_pl.models.kv_cache import cache_kwargs, output_cache, reserve
from kedit_pl.models.load import load_model


@torch.no_grad()
def step_ms(model, rows: list[list[int]], steps: int, reserved: bool) -> tuple[float, list[list[int]]]:
    """Milliseconds per decoding step after the prompt pass, and the generated tokens."""
    out, mask = prefill(model, rows, 0, "cpu")
    cache = output_cache(out)
    if reserved:
        reserve(cache, steps)
    pos, nxt, new = mask.sum(-1, keepdim=True) - 1, out.logits[:, -1].argmax(-1), []
    t = time.perf_counter()
    for _ in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(model, cache))
        nxt = out.logits[:, -1].argmax(-1)
        new.append(nxt)
    return (time.perf_counter() - t) / steps * 1000, torch.stack(new, 1).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--prefix", type=int, default=1000, help="tokens of each shared prefix")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(compose("edit", [f"model={args.model}", "paths.output_dir=/tmp/decode_step"]).model).model
    model.eval()
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(100, 30000, (n,), generator=g).tolist()  # noqa: E731
    prefixes = [rand(args.prefix + 20 * i) for i in range(4)]
    records = [[p + rand(12) for _ in range(10)] for p in prefixes]
    short = [rand(12) for _ in range(160)]

    def best(fn):
        runs = [fn() for _ in range(args.reps)]
        return min(r[0] for r in runs), runs[0][1]

    table = Table(title=f"ms per greedy decoding step, {args.model}, {args.threads} thread(s), best of {args.reps}")
    for col in ("layout", "before", "after", "before / after", "same tokens"):
        table.add_column(col)
    for name, rows in ((f"10 rows, one {args.prefix}-token prefix", records[0]), ("160 rows, 12-token prompts", short)):
        (a, ta), (b, tb) = best(lambda: step_ms(model, rows, args.steps, False)), \
            best(lambda: step_ms(model, rows, args.steps, True))
        table.add_row(f"{name}: concatenated → reserved", f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}", str(ta == tb))
    per = [best(lambda r=r: step_ms(model, r, args.steps, True)) for r in records]
    together = best(lambda: step_ms(model, [row for r in records for row in r], args.steps, True))
    a, b = sum(ms for ms, _ in per), together[0]
    same = [row for _, toks in per for row in toks] == together[1]
    table.add_row("4 records × 10 rows, own prefixes: a batch each → one batch", f"{a:.0f}", f"{b:.0f}",
                  f"{a / b:.2f}", str(same))
    Console().print(table)
    print(f"decoding only; the prompt passes are not timed. generate.PREFIXED_BATCH_TOKENS = "
          f"{generate.PREFIXED_BATCH_TOKENS} cached positions per prefixed batch")


if __name__ == "__main__":
    main()
