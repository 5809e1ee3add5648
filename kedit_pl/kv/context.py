"""Context templates: short text prefixes sampled from the model itself, ending in "{}" (ROME §3.1 / App. E.5).

ROME averages the key over prefixes x_j (k* = 1/N Σ_j k(x_j + s)) and optimizes v* over the same prefixed
prompts, so that the edit generalizes beyond the exact rewrite prompt. The templates are "{}" plus, for each
(length, count) pair, `count` top-k samples of `length` tokens started from a few fixed words, each followed
by ". {}". Generation is seeded, so a model always gets the same templates; they are cached in memory and on
disk (JSON, atomic).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.io import read_json_cache, save_json_cache
from kedit_pl.tokens import prompt_ids

STARTS = ("The", "Therefore", "Because", "I", "You")
DEFAULT_LENGTHS = ((5, 10), (10, 10))  # ROME's context_template_length_params
_MEMORY: dict[str, list[str]] = {}


@torch.no_grad()
def sample_prefixes(model: nn.Module, tok: PreTrainedTokenizerBase, start: str, n: int, length: int,
                    generator: torch.Generator, top_k: int = 5) -> list[str]:
    """`n` top-k samples continuing `start` until `length` tokens (start included, special tokens excluded)."""
    base = prompt_ids(tok, start)
    n_special = len(base) - len(tok(start, add_special_tokens=False)["input_ids"])
    ids = torch.tensor([base] * n, dtype=torch.long)
    device = next(model.parameters()).device
    for _ in range(max(0, length - (len(base) - n_special))):
        logits = model(input_ids=ids.to(device), use_cache=False).logits[:, -1].float().cpu()
        top = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
        ids = torch.cat([ids, top.indices.gather(1, pick)], dim=1)
    return tok.batch_decode(ids[:, n_special:], skip_special_tokens=True)


def _per_start(count: int, starts: Sequence[str]) -> int:
    return max(1, int(count) // len(starts))


def template_groups(lengths: Sequence[Sequence[int]] = DEFAULT_LENGTHS, starts: Sequence[str] = STARTS) -> list[int]:
    """Sizes of the consecutive groups in `generate_templates`' output: the plain "{}", then one group of
    prefixes per (length, count) pair."""
    return [1] + [_per_start(count, starts) * len(starts) for _, count in lengths]


def _clean(text: str) -> str:
    """One line, no braces (they would break str.format), no trailing whitespace."""
    return re.sub(r"\s+", " ", text.replace("{", " ").replace("}", " ")).strip()


def generate_templates(model: nn.Module, tok: PreTrainedTokenizerBase,
                       lengths: Sequence[Sequence[int]] = DEFAULT_LENGTHS, seed: int = 0,
                       starts: Sequence[str] = STARTS) -> list[str]:
    """["{}"] + sampled prefixes + ". {}", deterministic for a given model and seed."""
    g = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        out = ["{}"]
        for length, count in lengths:
            for s in starts:
                out += [_clean(t) + ". {}"
                        for t in sample_prefixes(model, tok, s, _per_start(count, starts), int(length), g)]
        return out
    finally:
        model.train(was_training)


def context_templates(model: nn.Module, tok: PreTrainedTokenizerBase, model_id: str,
                      lengths: Sequence[Sequence[int]] = DEFAULT_LENGTHS, seed: int = 0,
                      cache_dir: str | Path | None = None) -> list[str]:
    """Cached `generate_templates`: `model_id` must identify the weights (e.g. name + model_fingerprint)."""
    lengths = [tuple(int(x) for x in pair) for pair in lengths]
    key = hashlib.sha256(json.dumps([model_id, lengths, seed, STARTS]).encode()).hexdigest()[:16]
    if key in _MEMORY:
        return list(_MEMORY[key])
    path = Path(cache_dir) / f"context_templates_{key}.json" if cache_dir else None
    entry = read_json_cache(path, "context templates") if path is not None else None
    if entry is not None:
        templates = entry["templates"]
    else:
        templates = generate_templates(model, tok, lengths, seed)
        if path is not None:
            save_json_cache(path, {"model": model_id, "lengths": lengths, "seed": seed, "templates": templates})
    _MEMORY[key] = list(templates)
    return list(templates)
