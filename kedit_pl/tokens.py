"""Tokenizing prompt + target pairs the same way everywhere.

Two known sources of wrong results in other libraries are handled here, explicitly:
- the target is tokenized on its own with a leading space and no special tokens (so a BOS-adding
  tokenizer such as Gemma's never inserts a BOS in the middle), then appended to the prompt ids;
- batches are always right-padded with an attention mask, and every position we read is computed
  from the real lengths, so the tokenizer's padding side never matters.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase


def target_ids(tok: PreTrainedTokenizerBase, target: str) -> list[int]:
    """Token ids of a target as a continuation: leading space, no special tokens."""
    ids = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return ids


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of a prompt, with the tokenizer's own special tokens (e.g. Gemma's BOS)."""
    return tok(prompt.rstrip())["input_ids"]


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    """The tokenizer's padding id: its pad token, else its EOS token, else 0."""
    return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)


@dataclass
class TargetBatch:
    """Right-padded prompt+target ids. `labels[b, t]` is the token predicted at position t (or -100)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: list[int]

    @property
    def target_mask(self) -> torch.Tensor:
        """True at the positions whose label is a target token."""
        return self.labels != -100

    def to(self, device: torch.device | str) -> "TargetBatch":
        """The same batch with its tensors on `device`."""
        return TargetBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                           self.prompt_lengths)


def encode_targets(tok: PreTrainedTokenizerBase, prompts: list[str], targets: list[str]) -> TargetBatch:
    """Batch `prompt + ' ' + target` so that logits at position t score label t (shifted by one)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    rows, labels, plens = [], [], []
    for p, t in zip(prompts, targets):
        pi, ti = prompt_ids(tok, p), target_ids(tok, t)
        ids = pi + ti
        lab = [-100] * len(ids)
        for j in range(len(ti)):  # logits at position len(pi)-1+j predict ti[j]
            lab[len(pi) - 1 + j] = ti[j]
        rows.append(ids), labels.append(lab), plens.append(len(pi))
    input_ids, mask = right_pad(rows, pad_id(tok))
    lab_t, _ = right_pad(labels, -100)
    return TargetBatch(input_ids, mask, lab_t, plens)


def right_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows -> right-padded ids and attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
    return ids, mask


def left_pad(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows -> left-padded ids and attention mask (every row's last token in the last column)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = torch.tensor(r)
        mask[b, width - len(r):] = 1
    return ids, mask


def encode_prompts(tok: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Right-padded prompt ids, attention mask, and each prompt's length."""
    rows = [prompt_ids(tok, p) for p in prompts]
    ids, mask = right_pad(rows, pad_id(tok))
    return ids, mask, [len(r) for r in rows]


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under `logits` (B, T, V); 0 where the label is -100."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    safe = labels.clamp_min(0)
    out = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return out * (labels != -100)


def subject_last_token(tok: PreTrainedTokenizerBase, template: str, subject: str) -> tuple[str, int]:
    """Fill `template` with `subject`; return the text and the index of the subject's last token.

    Raises ValueError if the subject does not tokenize as a contiguous prefix-aligned span in context
    (which would make the key k* silently wrong).
    """
    from kedit_pl.errors import EditFailed

    if template.count("{}") != 1:
        raise EditFailed(f"template {template!r} must contain exactly one '{{}}'")
    prefix = template[: template.index("{}")]
    text = template.format(subject)
    n_prefix_subj = len(prompt_ids(tok, (prefix + subject)))
    full = prompt_ids(tok, text)
    if full[:n_prefix_subj] != prompt_ids(tok, prefix + subject):
        raise EditFailed(
            f"subject {subject!r} tokenizes differently inside {text!r}; cannot locate its last token")
    return text, n_prefix_subj - 1


def subject_token_range(tok: PreTrainedTokenizerBase, template: str, subject: str) -> tuple[str, int, int]:
    """Fill `template` with `subject`; return the text and the subject's token span [start, end).

    The prefix before the subject must tokenize as a prefix of the full prompt (else EditFailed),
    so the span never straddles a token shared with the surrounding text. Used by causal tracing.
    """
    from kedit_pl.errors import EditFailed

    text, last = subject_last_token(tok, template, subject)
    pre = prompt_ids(tok, template[: template.index("{}")])
    if prompt_ids(tok, text)[: len(pre)] != pre or len(pre) > last:
        raise EditFailed(f"subject {subject!r} shares a token with its prefix in {text!r}; cannot find its first token")
    return text, len(pre), last + 1
