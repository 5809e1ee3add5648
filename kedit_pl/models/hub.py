"""Models from the Hugging Face Hub or a local `save_pretrained` folder, failing in one line when offline.

`source: hub` (a family YAML with `hub_id`) checks the YAML's templates on a meta-device skeleton before any
weight download. `source: hf` (conf/model/hf.yaml, `model.path` = hub id or local folder) infers the
templates from the skeleton instead (models/infer.py).
"""
from __future__ import annotations

import importlib
import json
import os
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping, TypeVar
from urllib.parse import urlparse

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, \
    PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.models.checks import check_arch, first_line
from kedit_pl.models.gguf import quiet_progress
from kedit_pl.models.spec import ModelSpec

FALLBACK_HINT = "or use model=smollm2_135m (embedded GGUF, no download)"

T = TypeVar("T")


def load_hub(c: Mapping[str, Any], spec: ModelSpec, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """from_pretrained(hub_id); the arch templates are checked on a meta-device copy before any weight download."""
    hub_id = c.get("hub_id")
    if not hub_id:
        raise ConfigError(f"model.hub_id is missing for source=hub; set it (e.g. openai-community/gpt2-xl) {FALLBACK_HINT}")
    hub_id = str(hub_id)
    config = _from_hub(hub_id, lambda local: AutoConfig.from_pretrained(hub_id, local_files_only=local))
    check_arch(skeleton(config), spec, config)
    return _pretrained(hub_id, dtype)


def load_path(c: Mapping[str, Any], dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """source=hf: `model.path` is a local folder or a hub id (its config was already read by the arch resolver)."""
    path = model_path(c)
    return _pretrained(path, dtype, local=Path(path).is_dir())


def model_path(c: Mapping[str, Any]) -> str:
    """`model.path` of a `model=hf` config, `~` expanded; missing is a one-line `ConfigError`."""
    path = c.get("path")
    if not path or str(path) == "???":
        raise ConfigError("model.path is missing for model=hf; set model.path=<hub id or local folder>")
    return os.path.expanduser(str(path))


def _pretrained(name: str, dtype: torch.dtype, local: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    def tokenizer(only_local: bool) -> PreTrainedTokenizerBase:
        return AutoTokenizer.from_pretrained(name, local_files_only=only_local)

    def model(only_local: bool) -> PreTrainedModel:
        with quiet_progress():
            return AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=only_local)

    if local:
        try:
            return model(True), tokenizer(True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"model.path: cannot load the folder '{name}' ({first_line(e)})") from None
    return _from_hub(name, model), _from_hub(name, tokenizer)


@lru_cache(maxsize=32)
def pretrained_config(path: str) -> PretrainedConfig:
    """The config of a local folder or hub id; a one-line error unless it is a causal LM transformers knows."""
    path = os.path.expanduser(path)
    folder = Path(path)
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path: '{path}' has no config.json; it is not a Hugging Face model folder")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"model.path: cannot read the config of '{path}' ({first_line(e)})") from None
    elif path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise ConfigError(f"model.path: '{path}' is not a folder (and not a hub id of the form owner/name)")
    else:
        config = _from_hub(path, lambda local: AutoConfig.from_pretrained(path, local_files_only=local))
    if type(config) not in AutoModelForCausalLM._model_mapping:
        raise ConfigError(f"model.path: '{path}' is a '{config.model_type}' model, which is not a causal "
                          f"(decoder) language model that AutoModelForCausalLM can load")
    return config


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The model built on the meta device (no memory, no weights): enough to read its module structure."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx", "httpx2", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors.append(getattr(mod, "HTTPError", None) or getattr(mod, "RequestException"))
    return tuple(e for e in errors if isinstance(e, type))


def _from_hub(hub_id: str, fetch: Callable[[bool], T]) -> T:
    """fetch(local_files_only): the local HF cache first, then the network, failing in one line."""
    errors = _hub_errors()
    try:
        return fetch(True)
    except errors:
        pass
    if _hub_offline():
        raise ConfigError(f"model.hub_id: '{hub_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                          f"set; fix: download it once with internet access, {FALLBACK_HINT}")
    reachable = _hub_reachable()
    if reachable is not None:
        raise ConfigError(f"model.hub_id: cannot reach the Hugging Face Hub to fetch '{hub_id}' ({reachable}); "
                          f"fix: connect to the internet, {FALLBACK_HINT}")
    try:
        return fetch(False)
    except errors as e:
        raise ConfigError(f"model.hub_id: cannot load '{hub_id}' from the Hugging Face Hub ({first_line(e)}); "
                          f"fix: check the id, the connection and (for gated models) HF_TOKEN, {FALLBACK_HINT}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable() -> str | None:
    """A fast DNS check of the hub host (skipped behind a proxy); None if it may be reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host}: {first_line(e)}"
    return None
