"""A model's key/value cache, across transformers releases.

transformers 5.2x names the forward argument `cache` and deprecates `past_key_values` (removed in 5.40);
older releases only know `past_key_values`. Callers pass a cache through `cache_kwargs`, never by name.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
from torch import nn
from transformers import DynamicCache


def cache_arg(model: nn.Module) -> str:
    """The keyword under which `model.forward` takes its key/value cache."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_kwargs(model: nn.Module, cache: DynamicCache | None) -> dict[str, Any]:
    """`{<the forward's cache keyword>: cache}`, or nothing when there is no cache."""
    return {} if cache is None else {cache_arg(model): cache}


def new_cache(model: nn.Module, kv: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> DynamicCache:
    """A DynamicCache for `model`, holding per-layer (keys, values) when given."""
    cache = DynamicCache(config=model.config)
    for i, (k, v) in enumerate(kv or ()):
        cache.update(k, v, i)
    return cache


def cache_layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values) of the layers a forward has filled."""
    return [(lay.keys, lay.values) for lay in cache.layers if getattr(lay, "is_initialized", True)]


def output_cache(out: Any) -> DynamicCache:
    """The cache a forward returned (`out.cache` in new releases, `out.past_key_values` in old ones)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values
