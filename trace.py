"""Causal tracing (ROME §2): an alias of `python locate.py locate=causal_trace`; `trace.X=...` means `locate.X=...`.

    python trace.py                                        # smollm2_135m, 50 known facts, hidden/mlp/attn
    python trace.py model=gemma3_270m trace.n_records=50
    python trace.py model=tiny_llama trace.known_only=false trace.answer=predicted trace.n_records=3
    python trace.py logger=wandb                           # also log the figures to W&B (offline)
    python trace.py resume=true hydra.run.dir=DIR          # continue an interrupted run (reuses DIR/traces.jsonl)

A thin wrapper: the entry point is kedit_pl/cli/trace.py (also the console script kedit-trace)."""
from kedit_pl.cli.trace import alias_args, main  # noqa: F401  (alias_args: tests/test_knowledge_neurons.py)

if __name__ == "__main__":
    main()
