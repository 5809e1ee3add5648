"""Documents and queries as left-padded token batches with per-row losses (shared by teaching, TracIn and
embeddings). A cloze document / query is scored on its target tokens only (FTRACE's masked-span objective); a
running-text document (no target) on every token after the first. Rows are left-padded, with position ids counted
from each row's first real token, so every row ends in the last column and the LM head runs on the last `keep`
positions only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.tokens import label_logprobs, left_pad, pad_id, prompt_ids, target_ids


@dataclass
class LossBatch:
    """A left-padded batch of (prompt, target) rows for per-example losses."""
    input_ids: torch.Tensor        # (B, T) left-padded
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor           # (B, T): labels[b, t] is the token predicted at position t, or -100
    keep: int                      # trailing positions holding every label

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def encode_row(tok: PreTrainedTokenizerBase, prompt: str, target: str, max_tokens: int) -> tuple[list[int], list[int]]:
    """Token ids and labels of one example (labels aligned to the predicting position, -100 elsewhere)."""
    if target:
        p, t = prompt_ids(tok, prompt), target_ids(tok, target)
        p = p[-max(1, max_tokens - len(t)):]  # a long prompt loses its beginning, never its answer
        ids = p + t
        labels = [-100] * (len(p) - 1) + t + [-100]
    else:
        ids = prompt_ids(tok, prompt)[:max_tokens]
        labels = ids[1:] + [-100]
    if len(ids) < 2 or all(x == -100 for x in labels):
        raise ValueError(f"{prompt!r} has no token to score")
    return ids, labels


def encode_examples(tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_tokens: int = 64) -> LossBatch:
    """(prompt, target) pairs -> one left-padded `LossBatch`."""
    rows, labs = zip(*(encode_row(tok, p, t, max_tokens) for p, t in pairs))
    ids, mask = left_pad(list(rows), pad_id(tok))
    labels, _ = left_pad(list(labs), -100)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    first = [(row != -100).nonzero()[0].item() for row in labels]
    return LossBatch(ids, mask, pos, labels, ids.shape[1] - min(first))


def example_losses(model: nn.Module, batch: LossBatch) -> torch.Tensor:
    """Mean label NLL of each row, shape (B,); differentiable."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                logits_to_keep=batch.keep)
    logits = out.logits[:, -batch.keep:]
    labels = batch.labels[:, -batch.keep:]
    lp = label_logprobs(logits, labels)
    return -lp.sum(-1) / (labels != -100).sum(-1).clamp_min(1)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (little padding), in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def token_lengths(tok: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]], max_tokens: int) -> list[int]:
    """Token count of each (prompt, target) row, truncated to `max_tokens`."""
    return [len(encode_row(tok, p, t, max_tokens)[0]) for p, t in pairs]

