"""General ability: perplexity of a fixed slice of held-out text (WikiText-2 validation by default).

One number per model state, cheap enough to measure once per batch of edits: it is what shows collapse
under mass and sequential editing (the edited facts' own metrics cannot).
"""
from __future__ import annotations

import math
import re
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.config import missing_data
from kedit_pl.errors import ConfigError

#: WikiText's tokenized release splits numbers and punctuation (" @-@ ", " , "); undo the common cases so the
#: text reads like the prose the model was trained on
_DETOK = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
          (" : ", ": "), (" 's ", "'s "), ("( ", "("), (" )", ")")]


def detokenize_wikitext(text: str) -> str:
    """Undo WikiText's tokenization spacing (` @-@ `, ` , `, ...) so the model reads ordinary text."""
    for a, b in _DETOK:
        text = text.replace(a, b)
    return re.sub(r"[ \t]+", " ", text)


@lru_cache(maxsize=8)
def _token_slice(tok: PreTrainedTokenizerBase, path: str, n_tokens: int) -> tuple[int, ...]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(missing_data("eval.perplexity.corpus", p))
    # read a prefix generous enough for n_tokens (≈4 characters a token), never the whole file when not needed
    with p.open(encoding="utf-8") as f:
        text = f.read(max(4096, n_tokens * 8))
    ids = tok(detokenize_wikitext(text), add_special_tokens=False)["input_ids"][:n_tokens]
    if len(ids) < 2:
        raise ConfigError(f"eval.perplexity.corpus: {p} holds fewer than 2 tokens")
    return tuple(ids)


@torch.no_grad()
def perplexity(model: nn.Module, tok: PreTrainedTokenizerBase, corpus: str | Path, n_tokens: int = 20_000,
               seq_len: int = 512, batch_size: int = 4) -> float:
    """exp(mean NLL) over the first `n_tokens` tokens of `corpus`, in non-overlapping windows of `seq_len`
    (a BOS is prepended to each window when the tokenizer has one; its prediction is not scored)."""
    ids = list(_token_slice(tok, str(corpus), int(n_tokens)))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    width = int(seq_len) - len(bos)
    windows = [bos + ids[i:i + width] for i in range(0, len(ids), width)]
    windows = [w for w in windows if len(w) >= 2]
    device = next(model.parameters()).device
    total_nll, total_n = 0.0, 0
    # equal lengths batch together; only the last window can be shorter
    for s in range(0, len(windows), int(batch_size)):
        chunk = windows[s:s + int(batch_size)]
        for length in sorted({len(w) for w in chunk}):
            rows = torch.tensor([w for w in chunk if len(w) == length], device=device)
            logits = model(input_ids=rows, use_cache=False).logits[:, :-1].float()
            labels = rows[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    reduction="sum")
            total_nll += float(nll)
            total_n += labels.numel()
    return math.exp(total_nll / max(1, total_n))
