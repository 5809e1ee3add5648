"""One entry point for every locating method: `locate.py` picks the run by `locate.name` (the config group)."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from kedit_pl.errors import ConfigError


def _runners() -> dict[str, Callable[[DictConfig], Any]]:
    from kedit_pl.locate.influence.run import run_influence
    from kedit_pl.locate.kn_run import run_knowledge_neurons
    from kedit_pl.locate.trace_run import run_causal_trace

    influence = {n: run_influence for n in ("tracin", "tracin_cosine", "embedding", "embedding_centered", "bm25")}
    return {"causal_trace": run_causal_trace, "knowledge_neurons": run_knowledge_neurons, **influence}


def run_locate(cfg: DictConfig) -> Any:
    """Run the locating method `cfg.locate` names."""
    runners = _runners()
    name = cfg.locate.get("name")
    if name not in runners:
        raise ConfigError(f"locate.name: {name!r}; choose one of {sorted(runners)} (locate=...)")
    return runners[name](cfg)
