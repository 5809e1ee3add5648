"""One entry point for every locating method: `locate.py` picks the run by `locate.runner` (default: `locate.name`).
The training-data influence configs share `runner: influence`, so a new influence method is one class + one config."""
from __future__ import annotations

from typing import Any, Callable

from omegaconf import DictConfig

from kedit_pl.errors import ConfigError


def _runners() -> dict[str, Callable[[DictConfig], Any]]:
    from kedit_pl.locate.influence.run import run_influence
    from kedit_pl.locate.kn_run import run_knowledge_neurons
    from kedit_pl.locate.trace_run import run_causal_trace

    return {"causal_trace": run_causal_trace, "knowledge_neurons": run_knowledge_neurons, "influence": run_influence}


def run_locate(cfg: DictConfig) -> Any:
    """Run the locating method `cfg.locate` names."""
    runners = _runners()
    runner = cfg.locate.get("runner") or cfg.locate.get("name")
    if runner not in runners:
        raise ConfigError(f"locate.runner: {runner!r} (locate={cfg.locate.get('name')}); choose one of "
                          f"{sorted(runners)}")
    return runners[runner](cfg)
