"""Greedy generation through a method's `logits_fn`, so routing editors (SERAC) generate as they score."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from kedit_pl.eval.scoring import LogitsFn
from kedit_pl.tokens import prompt_ids


@torch.no_grad()
def greedy(logits_fn: LogitsFn, tok: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 12,
           device: torch.device | str = "cpu") -> str:
    """The greedy continuation of `prompt` (without the prompt), stopping at eos."""
    ids = prompt_ids(tok, prompt)
    n_prompt = len(ids)
    for _ in range(max_new_tokens):
        x = torch.tensor([ids], device=device)
        nxt = int(logits_fn(x, torch.ones_like(x), [n_prompt], 1)[0, -1].argmax())
        if nxt == tok.eos_token_id:
            break
        ids.append(nxt)
    return tok.decode(ids[n_prompt:], skip_special_tokens=True)


def first_phrase(text: str) -> str:
    """The answer part of a continuation: up to the first sentence mark or line break ("French, and ..." -> "French")."""
    for stop in ("\n", ".", ",", ";", "!", "?", " and ", " but "):
        text = text.split(stop)[0]
    return text.strip()
