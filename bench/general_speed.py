"""General ability (WikiText perplexity) per edited state: a whole pass against one that starts at the edited block.

    python bench/general_speed.py [--model smollm2_135m] [--layers 1 24 27] [--states 3] [--n-tokens 20000]

For each layer L (ROME's 1, GRACE's 24, MEND's 27 on smollm2_135m), `--states` edited states are made in turn:
the MLP output projection of block L gets random noise (a stand-in for an edit: what matters is which block
changed). Each state is measured twice in the same process: by `GeneralAbility` (the first state of a layer
runs whole and keeps the hidden states entering block L, the later ones start there; eval/block_inputs.py), and
by a plain whole-model pass. Prints seconds of both, their ratio over the later states, and whether the
perplexities are identical to the last bit.
"""
from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from rich.console import Console
from rich.table import Table

from kedit_pl.config import compose
from kedit_pl.eval.groups.general import GeneralAbility
from kedit_pl.eval.perplexity import perplexity
from kedit_pl.models.load import load_model
from kedit_pl.weights import EditHandle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 24, 27])
    ap.add_argument("--states", type=int, default=3, help="edited states per layer (the first keeps the inputs)")
    ap.add_argument("--n-tokens", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose("edit", [f"model={args.model}", "paths.output_dir=/tmp/general_speed", "eval=full"])
    m = load_model(cfg.model)
    m.model.eval()
    settings = {**dict(cfg.eval.general), "n_tokens": args.n_tokens}
    table = Table(title=f"general ability per state, {args.model}, {args.n_tokens} tokens, {args.threads} thread(s)")
    for col in ("layer", "state", "kept-block s", "whole s", "whole / kept", "identical"):
        table.add_column(col)
    for layer in args.layers:
        g = GeneralAbility(**settings)
        name = m.spec.module_name("mlp_out", layer) + ".weight"
        param = dict(m.model.named_parameters())[name]
        orig = param.detach().clone()
        for s in range(args.states):
            with torch.no_grad():
                param.copy_(orig + 1e-2 * torch.randn(orig.shape, generator=torch.Generator().manual_seed(s)))
            try:
                method = SimpleNamespace(model=m.model, tok=m.tokenizer, spec=m.spec,
                                         last_handle=EditHandle(originals={name: orig}))
                t = time.perf_counter()
                kept = g.measure(method, [])[0]["ppl"]
                t_kept = time.perf_counter() - t
                t = time.perf_counter()
                whole = perplexity(m.model, m.tokenizer, settings["corpus"], args.n_tokens,
                                   int(settings.get("seq_len", 512)), int(settings.get("batch_size", 4)))
                t_whole = time.perf_counter() - t
            finally:
                with torch.no_grad():
                    param.copy_(orig)
            table.add_row(str(layer), str(s) + (" (keeps)" if s == 0 else ""), f"{t_kept:.1f}", f"{t_whole:.1f}",
                          f"{t_whole / t_kept:.2f}", str(kept == whole))
    Console().print(table)


if __name__ == "__main__":
    main()
