"""The config resolvers of conf/model/hf.yaml: ${kedit_hf_arch:PATH}, ${kedit_hf_default:PATH,rome.layer} and
${kedit_hf_name:PATH}, which read a hub id or folder's config and infer its architecture (models/infer.py) on a
meta-device skeleton (models/hub.py). Importing this module registers them; models/load.py and the entry points
(kedit_pl/cli.py) do, so any composed config that reaches a model resolves."""
from __future__ import annotations

import re
from typing import Any

from omegaconf import OmegaConf

from kedit_pl.models.hub import pretrained_config, skeleton
from kedit_pl.models.infer import infer_arch, method_defaults


def hf_arch(path: str) -> dict[str, Any]:
    """The inferred `model.arch` of the model at `path`."""
    return infer_arch(skeleton(pretrained_config(str(path))))


def hf_default(path: str, key: str) -> Any:
    """One entry of `method_defaults` ('rome.layer', ...) for the model at `path` (one resolver per field: OmegaConf
    cannot interpolate into a node that a resolver returned)."""
    method, field = key.split(".")
    return method_defaults(int(pretrained_config(str(path)).get_text_config().num_hidden_layers))[method][field]


def hf_name(path: str) -> str:
    """A short run-folder-safe name for a hub id or folder: hf_<last part>."""
    tail = str(path).rstrip("/").rsplit("/", 1)[-1] or "model"
    return "hf_" + re.sub(r"[^A-Za-z0-9_.-]+", "_", tail)


def register() -> None:
    """Register the resolvers (once)."""
    for name, fn in (("kedit_hf_arch", hf_arch), ("kedit_hf_default", hf_default), ("kedit_hf_name", hf_name)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=True)


register()
