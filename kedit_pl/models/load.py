"""Loading a model, its tokenizer and its ModelSpec from the Hydra `model` node.

Sources, one module each: `gguf` (models/gguf.py: an embedded GGUF dequantized once into a verified cache),
`hub` (models/hub.py: `from_pretrained(hub_id)` with a family YAML's templates), `hf` (models/hub.py: any hub id
or local folder, `model.path`, templates inferred by models/infer.py), `tiny` (models/tiny.py: seeded random
init, byte-level tokenizer). Every load is checked (models/checks.py): the templates resolve to real modules,
the sizes match the checkpoint and the tokenizer fits the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.models.checks import GLOBAL, LAYERED, WEIGHTED, check_arch, check_tokenizer_matches, freeze, \
    prepare_tokenizer
from kedit_pl.models.gguf import CACHE_FORMAT, MARKER, cache_problem, cache_root, gguf_path, load_gguf
from kedit_pl.models.hub import FALLBACK_HINT, load_hub, load_path
from kedit_pl.models.resolvers import register as register_resolvers
from kedit_pl.models.spec import ModelSpec
from kedit_pl.models.tiny import byte_tokenizer, tiny_model

register_resolvers()  # conf/model/hf.yaml's ${kedit_hf_arch:...}: a composed config resolves wherever a model loads

SOURCES = ("gguf", "hub", "hf", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A frozen eval-mode CPU model, its right-padding tokenizer (pad set) and its ModelSpec."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec


def load_model(cfg: Mapping[str, Any] | DictConfig) -> LoadedModel:
    """Load the model described by the `model` config node (see conf/model/*.yaml)."""
    c = _plain(cfg)
    source = c.get("source", "gguf")
    if source not in SOURCES:
        raise ConfigError(f"model.source: unknown source {source!r}; use one of {', '.join(SOURCES)}")
    spec = _spec(c)
    dtype = _dtype(c.get("dtype", "float32"))
    if source == "tiny":
        model, tok = _load_tiny(c)
        model = model.to(dtype)
    elif source == "gguf":
        model, tok = load_gguf(c, dtype)
    elif source == "hub":
        model, tok = load_hub(c, spec, dtype)
    else:
        model, tok = load_path(c, dtype)
    prepare_tokenizer(tok)
    freeze(model)
    check_arch(model, spec)
    check_tokenizer_matches(model, tok, spec)
    return LoadedModel(model=model, tokenizer=tok, spec=spec)


def _plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The `model` node as a plain resolved dict (interpolations such as ${oc.env:...} resolved)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    try:
        out = OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # a resolver (models/resolvers.py) raised a ConfigError: OmegaConf wraps it
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    if not isinstance(out, dict):
        raise ConfigError(f"model: expected a mapping, got {type(out).__name__}; pass the Hydra `model` node")
    return out


def _spec(c: Mapping[str, Any]) -> ModelSpec:
    if not c.get("name"):
        raise ConfigError("model.name is missing; set it, e.g. name: smollm2_135m")
    if not isinstance(c.get("arch"), Mapping):
        raise ConfigError(f"model.arch is missing for model '{c['name']}'; add an arch block (see conf/model/arch/)")
    override = c.get("arch_override") or {}
    spec = ModelSpec.from_config({**c, "arch": {**c["arch"], **override}})
    for field_name in ("n_layers", "hidden_size"):
        value = getattr(spec, field_name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.arch.{field_name}: {value!r} is not a positive integer")
    return spec


def _dtype(name: Any) -> torch.dtype:
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def _load_tiny(c: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not isinstance(c.get("tiny"), Mapping):
        raise ConfigError("model.tiny is missing; source=tiny needs a tiny block (model_type, seed, config kwargs)")
    tok = byte_tokenizer()
    return tiny_model(c["tiny"], tok), tok


__all__ = ["LoadedModel", "load_model", "check_tokenizer_matches", "check_arch", "cache_root", "gguf_path",
           "cache_problem", "SOURCES", "MARKER", "CACHE_FORMAT", "LAYERED", "GLOBAL", "WEIGHTED", "FALLBACK_HINT"]
