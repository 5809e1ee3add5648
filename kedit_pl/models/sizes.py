"""A model's architecture without its weights: the transformers config written in the model YAML (`model.config`:
model_type + config kwargs, hand-written from the published sizes), built on the meta device. The memory plan
(kedit_pl/plan.py) counts parameters on it and the meta-device tests resolve every method's modules on it; no
download, no memory."""
from __future__ import annotations

from typing import Any, Mapping

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from kedit_pl.errors import ConfigError
from kedit_pl.models.hub import skeleton
from kedit_pl.models.tiny import byte_tokenizer


def size_config(c: Mapping[str, Any]) -> PretrainedConfig:
    """The transformers config of the `model` node: `model.config`, or a tiny model's `model.tiny` block."""
    block = c.get("config") or c.get("tiny")
    if not isinstance(block, Mapping) or not block.get("model_type"):
        raise ConfigError(f"model.config: model '{c.get('name')}' has no sizes (a `config:` block with model_type "
                          f"and the transformers config kwargs); add one to its YAML to plan memory without loading")
    kwargs = {k: v for k, v in dict(block).items() if k not in ("model_type", "seed")}
    if c.get("tiny") is block:
        kwargs.setdefault("vocab_size", len(byte_tokenizer()))
    try:
        return AutoConfig.for_model(str(block["model_type"]), **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.config: cannot build a '{block['model_type']}' config ({e})") from None


def meta_model(c: Mapping[str, Any]) -> nn.Module:
    """The model of the `model` node on the meta device (structure and shapes, no weights)."""
    return skeleton(size_config(c))
