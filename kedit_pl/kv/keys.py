"""Keys k: the input of the MLP output projection at the subject's last token (ROME §3.1, eq. 3).

k* = 1/N Σ_j k(x_j + s): the mean over context templates x_j of the key at the subject's last token, with the
relation prompt following the subject. Attention is causal, so the key only depends on the text up to the
subject: each row is cut right after the subject, and all requests × templates run in batched forwards that
stop after the edit layer's projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import EditFailed
from kedit_pl.hooks import StopForward, capture, stop_after
from kedit_pl.models.spec import ModelSpec
from kedit_pl.tokens import pad_id, prompt_ids, right_pad, subject_last_token


@dataclass(frozen=True)
class SubjectPrompt:
    """A context-prefixed rewrite prompt of one request, with the subject's last-token index."""

    request: int  # index into the request list
    template: int  # index into the context templates
    text: str  # the full prompt (template, relation prompt and subject filled in)
    subject_idx: int  # token index of the subject's last token in prompt_ids(text)


def subject_prompts(tok: PreTrainedTokenizerBase, requests: list[EditRequest],
                    templates: list[str]) -> list[SubjectPrompt]:
    """Every (request, template) prompt, request-major; EditFailed (naming the case) if a subject is not found."""
    out = []
    for r, req in enumerate(requests):
        for t, ctx in enumerate(templates):
            try:
                text, idx = subject_last_token(tok, ctx.format(req.prompt), req.subject)
            except EditFailed as e:
                raise EditFailed(f"case_id={req.case_id}: {e}") from None
            out.append(SubjectPrompt(r, t, text, idx))
    return out




@torch.no_grad()
def keys_at(model: nn.Module, tok: PreTrainedTokenizerBase, module: str, prompts: list[SubjectPrompt],
            batch_size: int = 64) -> torch.Tensor:
    """The input of `module` at each prompt's subject-last token, (len(prompts), d_k)."""
    device = next(model.parameters()).device
    rows = [prompt_ids(tok, p.text)[: p.subject_idx + 1] for p in prompts]
    out = []
    was_training = model.training
    model.eval()
    try:
        with capture(model, [module], inputs=True, outputs=False) as cap, stop_after(model, module):
            for b0 in range(0, len(rows), batch_size):
                ids, mask = right_pad(rows[b0: b0 + batch_size], pad_id(tok))
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except StopForward:
                    pass
                last = mask.sum(1) - 1  # the subject's last token ends each row
                out.append(cap.inputs[module][torch.arange(len(last), device=device), last.to(device)].detach())
    finally:
        model.train(was_training)
    return torch.cat(out)


def template_keys(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                  requests: list[EditRequest], templates: list[str], batch_size: int = 64) -> torch.Tensor:
    """The key at `layer`'s mlp_out for every request and template, (R, T, d_k)."""
    prompts = subject_prompts(tok, requests, templates)
    k = keys_at(model, tok, spec.module_name("mlp_out", layer), prompts, batch_size)
    return k.view(len(requests), len(templates), -1)


def compute_keys(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                 requests: list[EditRequest], templates: list[str], batch_size: int = 64,
                 groups: Sequence[int] | None = None) -> torch.Tensor:
    """k* per request at `layer`'s mlp_out, (R, d_k): the mean over templates (ROME eq. 3), or, with `groups`
    (sizes of consecutive template groups, kv/context.template_groups), the mean of the group means, as MEMIT's
    reference code weights its contexts (the plain prompt is a group of its own, so it carries half the weight
    beside one group of prefixes)."""
    k = template_keys(model, tok, spec, layer, requests, templates, batch_size)
    if groups is None:
        return k.mean(1)
    if sum(groups) != len(templates) or min(groups) < 1:
        raise ValueError(f"compute_keys: template groups {list(groups)} do not partition {len(templates)} templates")
    return torch.stack([part.mean(1) for part in k.split(list(groups), dim=1)]).mean(0)
