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
from transformers.cache_utils import DynamicLayer


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


def full_attention_cache(model: nn.Module) -> bool:
    """Whether every layer of `model`'s cache keeps all positions: plain DynamicLayers, no sliding window (Gemma
    3's local layers crop to theirs)."""
    return all(type(layer) is DynamicLayer for layer in new_cache(model).layers)


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer with room for more tokens: `update` writes the new
    tokens in place and returns a view, where DynamicLayer concatenates, copying the whole cache at every
    decoding step (1.2-1.4x per step for 10 rows after a 1,000-token prompt on CPU, `bench/decode_step.py`,
    `docs/scale.md`). The values returned are the same; when the room runs out it doubles."""

    @classmethod
    def from_layer(cls, layer: DynamicLayer, room: int) -> "ReservedLayer":
        """`layer`'s keys and values in a buffer with `room` more positions."""
        new = cls()
        new.__dict__.update(layer.__dict__)
        new._reserve(room)
        return new

    def _reserve(self, room: int) -> None:
        n = self.keys.shape[-2]
        k = self.keys.new_empty(*self.keys.shape[:-2], n + room, self.keys.shape[-1])
        v = self.values.new_empty(*self.values.shape[:-2], n + room, self.values.shape[-1])
        k[..., :n, :], v[..., :n, :] = self.keys, self.values
        self._k, self._v = k, v
        self.keys, self.values = k[..., :n, :], v[..., :n, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        n, new = self.keys.shape[-2], key_states.shape[-2]
        if n + new > self._k.shape[-2]:
            self._reserve(max(new, n))
        self._k[..., n:n + new, :] = key_states
        self._v[..., n:n + new, :] = value_states
        self.keys, self.values = self._k[..., :n + new, :], self._v[..., :n + new, :]
        return self.keys, self.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Rows reordered into a fresh buffer (the old one may be shared with other rows)."""
        self.keys, self.values = self.keys.index_select(0, beam_idx), self.values.index_select(0, beam_idx)
        self._reserve(self._k.shape[-2] - self.keys.shape[-2])


def reserve(cache: DynamicCache, room: int) -> DynamicCache:
    """Give every full-attention layer of `cache` room for `room` more tokens (`ReservedLayer`), in place, before a
    decoding loop. Sliding-window layers (Gemma 3's local ones) keep their own update, which crops to the window."""
    for i, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) and layer.keys.numel():
            cache.layers[i] = ReservedLayer.from_layer(layer, room)
    return cache
