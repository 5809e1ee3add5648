"""Causal tracing (ROME §2): an alias of `python locate.py locate=causal_trace`; `trace.X=...` means `locate.X=...`.

    python trace.py                                        # smollm2_135m, 50 known facts, hidden/mlp/attn
    python trace.py model=gemma3_270m trace.n_records=50
    python trace.py model=tiny_llama trace.known_only=false trace.answer=predicted trace.n_records=3
    python trace.py logger=wandb                           # also log the figures to W&B (offline)
    python trace.py resume=true hydra.run.dir=DIR          # continue an interrupted run (reuses DIR/traces.jsonl)
"""
import sys

import hydra
from omegaconf import DictConfig

import kedit_pl.config  # noqa: F401  (registers the ${kedit_root:} resolver)
from kedit_pl.locate.run import run_locate
from kedit_pl.pipeline import cli


def alias_args(argv: list[str]) -> list[str]:
    """`trace.X=v` -> `locate.X=v` (also with +/~ prefixes), with `locate=causal_trace` first."""
    out = ["locate=causal_trace"]
    for a in argv:
        head = a[:1] if a[:1] in "+~" else ""
        out.append(head + "locate." + a[len(head) + 6:] if a[len(head):].startswith("trace.") else a)
    return out


@hydra.main(config_path="conf", config_name="locate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    cli(run_locate, cfg)


if __name__ == "__main__":
    sys.argv = [sys.argv[0]] + alias_args(sys.argv[1:])
    main()
