"""Up-front checks of an edit run's config: every bad value is one line before anything heavy loads."""
from __future__ import annotations

from typing import Any

import os

from omegaconf import DictConfig, OmegaConf

from kedit_pl.data.datamodule import parse_range
from kedit_pl.data.splits import RULES, SPLITS
from kedit_pl.errors import ConfigError
from kedit_pl.eval.callback import MODES
from kedit_pl.io import folder_problem

#: the folders a run writes its caches into (model weights, statistics, pre-edit scores)
CACHE_FOLDERS = ("paths.cache_dir", "model.cache_dir", "stats.cache_dir")


def _positive_int(field: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        what = "a positive integer" + (" or null" if allow_none else "")
        raise ConfigError(f"{field}: must be {what}, got {value!r}")


def _bool(field: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{field}: must be true or false, got {value!r}")


def validate_edit_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first bad field of `edit.*`, `dataset.*` selection or `seed`."""
    e, d = cfg.edit, cfg.dataset
    if e.mode not in MODES:
        raise ConfigError(f"edit.mode: must be one of {', '.join(MODES)}, got {e.mode!r}")
    _positive_int("edit.batch_size", e.batch_size)
    _positive_int("edit.eval_batch_size", e.eval_batch_size)
    for name in ("resume", "overwrite", "skip_invalid"):
        _bool(f"edit.{name}", e.get(name, False))
    if e.get("resume") and e.get("overwrite"):
        raise ConfigError("edit.resume and edit.overwrite: pick one (resume continues a run, overwrite restarts it)")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(f"seed: must be an integer, got {cfg.seed!r}")
    _positive_int("dataset.limit", d.get("limit"), allow_none=True)
    r = parse_range(d.get("range"))
    if r is not None and not 0 <= r[0] < r[1]:
        raise ConfigError(f"dataset.range: expected 'START:END' with 0 <= START < END, got {d.get('range')!r}")
    ids = d.get("ids")
    if ids is not None and (isinstance(ids, (str, int)) or len(ids) == 0):
        raise ConfigError(f"dataset.ids: must be a non-empty list of case_ids or null, got {ids!r}")
    if d.get("on_invalid", "error") not in ("error", "skip"):
        raise ConfigError(f"dataset.on_invalid: must be 'error' or 'skip', got {d.get('on_invalid')!r}")
    if (d.get("split") or "all") not in SPLITS:
        raise ConfigError(f"dataset.split: must be one of {', '.join(SPLITS)}, got {d.get('split')!r}")
    if (d.get("split") or "all") != "all" and d.get("split_rule") not in RULES:
        raise ConfigError(f"dataset.split={d.get('split')}: dataset.split_rule must be one of {', '.join(RULES)}, got "
                          f"{d.get('split_rule')!r} (a file without a split rule only has dataset.split=all)")
    validate_cache_folders(cfg)


def validate_cache_folders(cfg: DictConfig) -> None:
    """Every cache folder of `CACHE_FOLDERS` that is set must be a folder or creatable as one."""
    for field in CACHE_FOLDERS:
        value = OmegaConf.select(cfg, field, default=None)
        problem = folder_problem(value) if value else None
        if problem:
            env = os.environ.get("KEDIT_CACHE")
            hint = f" (from KEDIT_CACHE={env})" if env and str(value).startswith(env) else ""
            raise ConfigError(f"{field}: {problem}{hint}; point it at a folder")


def validate_processes(cfg: DictConfig, n: int) -> None:
    """What an edit run over `n` > 1 DDP processes cannot do (edits accumulate in one model; generations are shown
    from one process)."""
    if n > 1 and cfg.edit.mode == "sequential":
        raise ConfigError(f"edit.mode=sequential: edits accumulate in one model, so it runs in one process; use "
                          f"trainer.devices=1 (got {n}) or edit.mode=single/batch")
    if n > 1 and int(cfg.edit.get("show") or 0):
        raise ConfigError(f"edit.show: generations are shown by a one-process run; use trainer.devices=1 (got {n}) "
                          f"or edit.show=0")
