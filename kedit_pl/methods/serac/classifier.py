"""SERAC's scope classifier g_φ(z_e, x), the paper's dense-embedding ("Embed") variant (Mitchell et al. 2022, §3).

Edit and input are embedded separately by a (fine-tuned) sentence encoder, and the in-scope logit is
    logit(z_e, x) = s · (cos(f(z_e), f(x)) − τ),   p = sigmoid(logit)
with a trainable scale s > 0 and threshold τ, trained with binary cross-entropy (the paper's eq. for l(φ)).
Because edits are embedded independently of the input, the memory's embeddings are computed once per edit and
a batch of inputs is scored against all stored edits with one matrix product.

The encoders (all-MiniLM-L6-v2, or a tiny random BERT for tests) and the embedding are the shared retrieval piece,
`kedit_pl/methods/retrieval.py`.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.methods.retrieval import embed_texts


class ScopeClassifier(nn.Module):
    """Embedding scope classifier: p(in scope of edit e | x) = sigmoid(s · (cos(f(e), f(x)) − τ))."""

    def __init__(self, encoder: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_length: int = 64,
                 init_scale: float = 10.0, init_threshold: float = 0.5) -> None:
        super().__init__()
        if init_scale <= 0:
            raise ConfigError(f"method.init_scale: must be > 0, got {init_scale}")
        self.encoder = encoder
        self.tok = tokenizer
        self.max_length = int(max_length)
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))  # s = exp(log_scale) stays positive
        self.threshold = nn.Parameter(torch.tensor(float(init_threshold)))

    @property
    def scale(self) -> torch.Tensor:
        """The logit scale (learned in log space)."""
        return self.log_scale.exp()

    def embed(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalized mean-pooled embeddings (N, d) of `texts`, in chunks."""
        return embed_texts(self.encoder, self.tok, texts, self.max_length, batch_size)

    def logits_from_cos(self, cos: torch.Tensor) -> torch.Tensor:
        """In-scope logits from cosine similarities: scale · (cos − threshold)."""
        return self.scale * (cos - self.threshold)

    def pair_logits(self, queries: torch.Tensor, edits: torch.Tensor) -> torch.Tensor:
        """In-scope logits (Q, E) of every query embedding against every edit embedding."""
        return self.logits_from_cos(queries @ edits.T)


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with positive and negative pairs weighted equally (few positives among many hard negatives)."""
    loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    pos, neg = labels.bool(), ~labels.bool()
    parts = [loss[m].mean() for m in (pos, neg) if m.any()]
    return torch.stack(parts).mean()
