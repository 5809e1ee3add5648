"""Saving and loading a trained SERAC editor without pickle.

`export` writes <dir>/classifier.safetensors, <dir>/counterfactual.safetensors and, last, <dir>/config.json
(the completion marker), each atomically. `load` reads such a folder, or a Lightning .ckpt from train.py
(torch.load(weights_only=True)); neither ever holds the frozen base model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kedit_pl.errors import ConfigError, DamagedFile
from kedit_pl.io import load_torch_checkpoint, read_json, read_tensors, save_tensors, write_json

FORMAT = "kedit_pl.serac/1"
CLASSIFIER, COUNTERFACTUAL, CONFIG = "classifier.safetensors", "counterfactual.safetensors", "config.json"
PARTS = {"classifier": CLASSIFIER, "cf_model": COUNTERFACTUAL}
HOW = "train one with `python train.py method=serac dataset=zsre` and pass method.checkpoint=<run dir>/editor"


def unique_tensors(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict without tied duplicates (safetensors refuses shared storage), and the dropped names."""
    kept: dict[str, torch.Tensor] = {}
    tied, seen = [], set()
    for name, t in module.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied.append(name)
            continue
        seen.add(key)
        kept[name] = t
    return kept, tied


def export(parts: dict[str, nn.Module], folder: str | Path, info: dict[str, Any]) -> Path:
    """Write each part's weights (safetensors) and then config.json describing them."""
    folder = Path(folder)
    tied: dict[str, list[str]] = {}
    for attr, file in PARTS.items():
        tensors, tied[attr] = unique_tensors(parts[attr])
        save_tensors(folder / file, tensors, metadata={"format": FORMAT, "part": attr})
    write_json(folder / CONFIG, {"format": FORMAT, "tied": tied, **info})
    return folder


def read_state(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Per-part tensors {"classifier": {...}, "cf_model": {...}} and the editor config from `path`."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / CONFIG).is_file():
            raise ConfigError(f"method.checkpoint: {path} has no {CONFIG} (an unfinished export?); {HOW}")
        try:
            config = read_json(path / CONFIG)
        except (ValueError, OSError) as e:
            raise DamagedFile(f"method.checkpoint: {path / CONFIG} is damaged ({e})") from None
        if config.get("format") != FORMAT:
            raise ConfigError(f"method.checkpoint: {path / CONFIG} is not a SERAC editor (format {config.get('format')!r})")
        return {attr: read_tensors(path / file, "method.checkpoint")[0] for attr, file in PARTS.items()}, config
    if path.is_file():
        ckpt = load_torch_checkpoint(path, "method.checkpoint")  # pickle-free: tensors and plain containers only
        state = ckpt.get("state_dict")
        if not isinstance(state, dict):
            raise ConfigError(f"method.checkpoint: {path} is not a Lightning checkpoint (no state_dict)")
        parts = {attr: {k[len(attr) + 1:]: v for k, v in state.items() if k.startswith(attr + ".")} for attr in PARTS}
        return parts, dict(ckpt.get("serac") or {})
    raise ConfigError(f"method.checkpoint: {path} does not exist; {HOW}")


def load_part(module: nn.Module, tensors: dict[str, torch.Tensor], tied: list[str], what: str) -> None:
    """Load `tensors` into `module`, allowing only tied duplicates to be missing."""
    try:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # shape mismatch: trained for another model/encoder
        raise ConfigError(f"method.checkpoint: the {what} weights do not fit ({str(e).splitlines()[0]}); was it "
                          f"trained with this model and method.encoder?") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise ConfigError(f"method.checkpoint: the {what} weights do not match ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected, e.g. {bad!r}); was it trained with this model and encoder?")
