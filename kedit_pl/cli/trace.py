"""Causal tracing (ROME §2) (`kedit-trace`, or `python trace.py` in a clone): an alias of
`kedit-locate locate=causal_trace`; `trace.X=...` means `locate.X=...`.

    kedit-trace                                        # smollm2_135m, 50 known facts, hidden/mlp/attn
    kedit-trace model=gemma3_270m trace.n_records=50
    kedit-trace model=tiny_llama trace.known_only=false trace.answer=predicted trace.n_records=3
    kedit-trace logger=wandb                           # also log the figures to W&B (offline)
    kedit-trace resume=true hydra.run.dir=DIR          # continue an interrupted run (reuses DIR/traces.jsonl)
"""
import sys

from kedit_pl.cli.locate import main as locate_main


def alias_args(argv: list[str]) -> list[str]:
    """`trace.X=v` -> `locate.X=v` (also with +/~ prefixes), with `locate=causal_trace` first."""
    out = ["locate=causal_trace"]
    for a in argv:
        head = a[:1] if a[:1] in "+~" else ""
        out.append(head + "locate." + a[len(head) + 6:] if a[len(head):].startswith("trace.") else a)
    return out


def main() -> None:
    """Entry point of `kedit-trace` / `trace.py`: `kedit-locate locate=causal_trace` with `trace.X` as `locate.X`."""
    sys.argv = [sys.argv[0]] + alias_args(sys.argv[1:])
    locate_main()


if __name__ == "__main__":
    main()
