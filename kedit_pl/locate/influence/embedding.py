"""Embedding similarity (Akyürek et al. 2022, "EMBED"): the cosine between the mean-pooled
hidden states of query (prompt + answer) and document at one layer of the (fine-tuned) model.

`center: true` subtracts the corpus' mean embedding first: a decoder's hidden states share a large common
component (a few massive dimensions), which otherwise dominates every cosine and makes the same documents the
nearest neighbours of every query (seen on SmolLM2; docs/training_data.md).

`skip_first: k` leaves each text's first k tokens out of the mean: on SmolLM2 the first token's hidden state is an
attention sink about 100 times larger than the others, so it dominates a plain mean (the vector then mostly says
1/length)."""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from kedit_pl.hooks import StopForward, capture, stop_after
from kedit_pl.locate.influence.base import InfluenceMethod, unit_rows
from kedit_pl.locate.influence.batches import length_batches
from kedit_pl.locate.influence.checkpoints import Checkpoint, applied
from kedit_pl.locate.influence.corpus import Document, Query
from kedit_pl.errors import ConfigError
from kedit_pl.tokens import left_pad, pad_id, prompt_ids


class EmbeddingSimilarity(InfluenceMethod):
    """Cosine similarity of mean-pooled hidden states at one layer (optionally centered, or without the first
    tokens)."""
    name = "embedding"

    def __init__(self, model=None, checkpoints: Sequence[Checkpoint] = (), layer: int | None = None,
                 checkpoint: str = "last", center: bool = False, skip_first: int = 0, batch_size: int = 32,
                 max_tokens: int = 48, name: str = "embedding", progress: bool = True, **_context: Any) -> None:
        if model is None:
            raise ValueError("EmbeddingSimilarity needs the loaded model (model=LoadedModel)")
        n = model.spec.n_layers
        self.layer = n // 2 if layer is None else int(layer)
        if not 0 <= self.layer < n:
            raise ConfigError(f"locate.method.layer: {self.layer} is out of range 0..{n - 1}")
        if checkpoint not in ("last", "none"):
            raise ConfigError(f"locate.method.checkpoint: {checkpoint!r}; use last (the fine-tuned model) or none")
        self.loaded, self.name, self.progress = model, name, progress
        self.ckpt = list(checkpoints)[-1] if checkpoint == "last" and checkpoints else None
        if int(skip_first) < 0:
            raise ConfigError(f"locate.method.skip_first: {skip_first} must be >= 0")
        self.batch_size, self.max_tokens, self.center = batch_size, max_tokens, bool(center)
        self.skip_first = int(skip_first)
        self._timing: dict[str, Any] = {}

    @torch.no_grad()
    def embed(self, texts: list[str], progress=None) -> torch.Tensor:
        """(N, hidden): mean over each text's tokens (after its first `skip_first`) of the hidden state after `layer`.
        A text no longer than `skip_first` keeps its last token."""
        tok, model, spec = self.loaded.tokenizer, self.loaded.model, self.loaded.spec
        rows = [prompt_ids(tok, t)[: self.max_tokens] for t in texts]
        out = torch.empty(len(texts), spec.hidden_size)
        name = spec.module_name("layer", self.layer)
        for idx in length_batches([len(r) for r in rows], self.batch_size):
            ids, mask = left_pad([rows[i] for i in idx], pad_id(tok))
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            with capture(model, [name]) as cap, stop_after(model, name):
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=pos)
                except StopForward:
                    pass
            h = cap.outputs[name].float()
            if self.skip_first:  # left padding: a row's k-th real token has cumulative mask k
                keep = mask.cumsum(-1) > self.skip_first
                keep[:, -1] = True
                mask = mask * keep
            m = mask.unsqueeze(-1).float()
            out[idx] = (h * m).sum(1) / m.sum(1)
            if progress:
                progress(len(idx))
        return out

    def _rank(self, queries: list[Query], corpus: list[Document]) -> torch.Tensor:
        from rich.progress import Progress

        with Progress(transient=False, disable=not self.progress) as bar, applied(self.loaded.model, self.ckpt):
            task = bar.add_task(f"{self.name}: documents (layer {self.layer})", total=len(corpus))
            t0 = time.perf_counter()
            e_doc = self.embed([d.text for d in corpus], lambda n: bar.advance(task, n))
            t1 = time.perf_counter()
            e_q = self.embed([q.text for q in queries])
            t2 = time.perf_counter()
        self._timing = {"s_per_document": (t1 - t0) / len(corpus), "s_per_query": (t2 - t1) / len(queries),
                        "layer": self.layer, "note": "one forward pass up to the layer per example"}
        if self.center:
            mu = e_doc.mean(0, keepdim=True)
            e_doc, e_q = e_doc - mu, e_q - mu
        return unit_rows(e_q) @ unit_rows(e_doc).T

    def timing(self) -> dict[str, Any]:
        return self._timing
