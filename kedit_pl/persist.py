"""What an edit run leaves besides its metrics: `edit.save=patch|model` and `edit.show=k` (hooks for run_edit)."""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from kedit_pl.errors import ConfigError
from kedit_pl.eval.show import EditShow
from kedit_pl.memory_patch import make_memory_patch
from kedit_pl.methods.base import MemoryEditMethod
from kedit_pl.patch import edit_meta, make_patch, save_model, save_patch
from kedit_pl.weights import EditMethodProtocol

log = logging.getLogger("kedit_pl")
SAVES = ("patch", "model")


class PatchWriter:
    """Writes each batch's edit as `<out>/patches/<step>_<case_id>.{safetensors,json}` while it is in place."""

    def __init__(self, folder: Path, cfg: DictConfig) -> None:
        self.folder, self.cfg = folder, cfg
        self.config = OmegaConf.to_container(cfg.method, resolve=True)

    def __call__(self, method: EditMethodProtocol, handle, batch: list, batch_idx: int) -> None:
        meta = edit_meta(self.cfg.method.name, self.cfg.model.name, batch, self.config, mode=self.cfg.edit.mode,
                         step=batch_idx)
        if isinstance(method, MemoryEditMethod):  # its memory rows, not weights (kedit_pl/memory_patch.py)
            patch = make_memory_patch(handle.method_state, method.memory_state(), meta)
        else:
            patch = make_patch(method.model, handle.originals, handle.low_rank, meta)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(batch[0].case_id))
        save_patch(patch, self.folder / f"{batch_idx:05d}_{name}")


def edit_hooks(cfg: DictConfig, method: EditMethodProtocol, requests: list, out: Path) -> list[Callable]:
    """The callbacks `EditEvalCallback` calls while each edit is in place; checks `edit.save` / `edit.show` first."""
    save, show = cfg.edit.get("save"), int(cfg.edit.get("show") or 0)
    if save is not None and save not in SAVES:
        raise ConfigError(f"edit.save: {save!r} is not one of {', '.join(SAVES)} (or null)")
    memory = isinstance(method, MemoryEditMethod)
    if save is not None and (save == "model" or not memory) and (memory or method.serves_own_logits()):
        raise ConfigError(f"edit.save={save}: method '{cfg.method.name}' routes inputs instead of changing weights; "
                          f"there are no weights to save{' (edit.save=patch saves its memory)' if memory else ''}")
    if save == "model" and cfg.edit.mode != "sequential":
        raise ConfigError(f"edit.save=model needs edit.mode=sequential (mode {cfg.edit.mode} restores the model after "
                          "each edit); use edit.save=patch to keep each edit")
    if show < 0:
        raise ConfigError(f"edit.show: {show} must be >= 0 (records to show)")
    hooks: list[Callable] = []
    if save == "patch":
        hooks.append(PatchWriter(out / "patches", cfg))
    if show:
        viewer = EditShow(show)
        viewer.before(method, requests)
        hooks.append(viewer)
    return hooks


def finish_hooks(cfg: DictConfig, method: EditMethodProtocol, hooks: list[Callable], out: Path,
                 requests: list) -> None:
    """After the last edit: print the show table, save the edited model (sequential + edit.save=model)."""
    for hook in hooks:
        if isinstance(hook, EditShow):
            hook.print()
    if cfg.edit.get("save") == "model":
        folder = save_model(method.model, method.tok, out / "model", edits=requests, replace=True,
                            what="edit.save=model")  # the run's own folder: replaced only if kedit_pl wrote it
        log.info("edited model saved to %s (AutoModelForCausalLM.from_pretrained loads it)", folder)
    elif cfg.edit.get("save") == "patch":
        log.info("patches in %s (python -m kedit_pl.patch list %s)", out / "patches", out / "patches")
