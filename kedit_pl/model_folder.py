"""Edited models saved as Hugging Face folders, and the one rule that keeps a user's files safe: kedit_pl writes a
model only into a new or empty folder, or replaces (when asked) a model folder it wrote itself and nothing else.

A folder we write holds `kedit_model.json` listing every file we put there. Replacing a folder needs
`replace=True` (`--replace` on the command line) and is refused when the folder holds anything that list lacks
(a file the user added): kedit_pl never deletes a file it did not write.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from kedit_pl.errors import ConfigError
from kedit_pl.io import read_json, write_json

#: the requests whose edits the saved weights hold (edit.save=model)
EDITS_FILE = "kedit_edits.json"
#: written last into every model folder we save: who wrote it and which files it holds
MARKER_FILE = "kedit_model.json"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _foreign_files(folder: Path) -> list[str] | None:
    """Files in `folder` that kedit_pl did not write there (None: the folder is not one we wrote)."""
    try:
        marker = read_json(folder / MARKER_FILE)
        ours = set(marker["files"]) | {MARKER_FILE}
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [f for f in _files(folder) if f not in ours]


def check_model_folder(folder: str | Path, replace: bool = False, what: str = "--out") -> bool:
    """Raise a one-line `ConfigError` unless `save_model` may write `folder`; True if it replaces a model there."""
    folder = Path(folder)
    if not folder.exists():
        return False
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder} is a file, not a folder; pick a new or empty folder")
    if not any(folder.iterdir()):
        return False
    foreign = _foreign_files(folder)
    if foreign is None:
        raise ConfigError(f"{what}: {folder} is not empty and is not a model folder written by kedit_pl (it has no "
                          f"{MARKER_FILE}); kedit_pl never deletes files it did not write: pick a new or empty folder")
    if not replace:
        flag = "--replace" if what == "--out" else "replace=True"
        raise ConfigError(f"{what}: {folder} already holds a model saved by kedit_pl; pass {flag} to replace it, "
                          f"or pick another folder")
    if foreign:
        raise ConfigError(f"{what}: {folder} holds {foreign[0]!r}, which kedit_pl did not write there "
                          f"({len(foreign)} such file(s)); move them out before replacing the model")
    return True


def save_model(model: nn.Module, tokenizer, folder: str | Path, edits: list | None = None, replace: bool = False,
               what: str = "--out") -> Path:
    """`save_pretrained` of the model and tokenizer into `folder` (checked by `check_model_folder` first), written
    in a temp folder and renamed into place, so `AutoModelForCausalLM.from_pretrained(folder)` loads the (edited)
    model. `edits` (requests) are listed in `kedit_edits.json` beside the weights."""
    folder = Path(folder)
    replacing = check_model_folder(folder, replace, what)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    old = tmp.with_name(tmp.name + ".old")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if edits is not None:
            write_json(tmp / EDITS_FILE, [request_dict(r) for r in edits])
        write_json(tmp / MARKER_FILE, {"written_by": "kedit_pl", "files": _files(tmp)})
        tmp.chmod(0o755)
        if replacing:
            folder.rename(old)  # checked above: only files we wrote
        elif folder.exists():
            folder.rmdir()  # empty
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return folder


def request_dict(req: Any) -> dict[str, Any]:
    """An EditRequest (or a dict) as the JSON of a patch or of kedit_edits.json."""
    d = asdict(req) if hasattr(req, "__dataclass_fields__") else dict(req)
    d.pop("extra", None)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
