"""The one interface of training-data influence methods: `rank(queries, corpus) -> scores`.

`scores[i, j]` says how strongly document j is a proponent of query i (higher = more). A method is one class
here plus one config in conf/locate/ whose `method._target_` names it; `build_method` instantiates it.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

import torch

from kedit_pl.errors import ConfigError
from kedit_pl.locate.influence.corpus import Document, Query


def check_inputs(queries: Sequence[Query], corpus: Sequence[Document]) -> None:
    """One-line errors for the inputs no method can rank."""
    if not corpus:
        raise ConfigError("influence corpus: it is empty; there is nothing to rank")
    if not queries:
        raise ConfigError("influence queries: there are none to rank the corpus for")
    for q in queries:
        if not q.answer or not q.answer.strip():
            raise ConfigError(f"influence query {q.id!r}: its answer is empty ({q.prompt!r} -> {q.answer!r}); a query "
                              f"needs the answer whose loss is traced")
        if not q.prompt.strip():
            raise ConfigError(f"influence query {q.id!r}: its prompt is empty")
    empty = [d.id for d in corpus if not d.text.strip()]
    if empty:
        raise ConfigError(f"influence corpus: document {empty[0]!r} is empty ({len(empty)} empty documents)")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit norm (cosine similarities are then dot products)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class InfluenceMethod(ABC):
    """Scores every (query, document) pair; subclasses implement `_rank`."""

    name: str = "influence"

    def rank(self, queries: Sequence[Query], corpus: Sequence[Document]) -> torch.Tensor:
        """Scores of shape (len(queries), len(corpus)), float32, on the CPU."""
        check_inputs(queries, corpus)
        scores = self._rank(list(queries), list(corpus))
        assert scores.shape == (len(queries), len(corpus)), scores.shape
        return scores.float().cpu()

    @abstractmethod
    def _rank(self, queries: list[Query], corpus: list[Document]) -> torch.Tensor: ...

    def timing(self) -> dict[str, Any]:
        """Seconds spent per document and per query in the last `rank` (what was computed, not cached)."""
        return {}


def build_method(mc: dict[str, Any], **context: Any) -> InfluenceMethod:
    """Instantiate `mc['_target_']` with the config's other keys plus the run's context (model, checkpoints, ...);
    each class takes the context keyword arguments it needs and ignores the rest."""
    import hydra

    target = mc.get("_target_")
    if not target:
        raise ConfigError("locate.method: no _target_ class")
    try:
        cls = hydra.utils.get_class(target)
    except Exception as e:
        raise ConfigError(f"locate.method._target_: cannot import {target!r} ({e})") from None
    kwargs = {k: v for k, v in mc.items() if k != "_target_"}
    try:
        return cls(**kwargs, **context)
    except TypeError as e:
        raise ConfigError(f"locate.method ({target}): bad setting ({e})") from None
