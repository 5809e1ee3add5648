"""Keys k: the input of the MLP output projection at the subject's last token (ROME §3.1, eq. 3).

k* = 1/N Σ_j k(x_j + s): the mean over context templates x_j of the key at the subject's last token, with the
relation prompt following the subject. Attention is causal, so the key only depends on the text up to the
subject: each row is cut right after the subject, and all requests × templates run in batched forwards that
stop after the edit layer's projection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import EditFailed
from kedit_pl.hooks import (
    StopForward,
    _on_hidden,
    _restructure,
    capture,
    override_forward,
    stop_after,
)
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
    return average_keys(template_keys(model, tok, spec, layer, requests, templates, batch_size), groups)


def average_keys(k: torch.Tensor, groups: Sequence[int] | None = None) -> torch.Tensor:
    """(R, T, d_k) template keys -> (R, d_k): the mean over templates, or with `groups` the mean of group means."""
    if groups is None:
        return k.mean(1)
    if sum(groups) != k.shape[1] or min(groups) < 1:
        raise ValueError(f"compute_keys: template groups {list(groups)} do not partition {k.shape[1]} templates")
    return torch.stack([part.mean(1) for part in k.split(list(groups), dim=1)]).mean(0)


class LayerKeys:
    """Keys k_i and block outputs layer after layer, for an edit that updates its layers from low to high (MEMIT
    Algorithm 1: the keys at layer l are read after the layers below l were updated, eq. 14 per layer).

    Only blocks at or above the lowest layer not yet read change between reads, so the input of that block is kept
    for every row (all positions, rows as `compute_keys` batches them) and each read runs from there: the keys at
    layer l run block l alone, and moving on to l' > l reruns blocks l..l'-1 with their current weights. For
    MEMIT's five layers 3-7 that is 12 block passes over the template rows instead of 30. The block outputs on the
    plain prompts ("{}", `outputs`) start from the same kept inputs. The numbers equal `compute_keys` and
    `methods.memit.block_outputs` up to float noise from other batch shapes (tests/test_memit.py).

    Reads must go up: a layer below the kept block, or a weight below it changed since it was kept, raises
    ValueError (the kept states would be stale).
    """

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, requests: list[EditRequest],
                 templates: list[str], batch_size: int = 64, part: tuple[int, int] = (0, 1)) -> None:
        if "{}" not in templates:
            raise ValueError("LayerKeys needs the plain template '{}' among the templates")
        self.model, self.spec, self.n_req, self.n_tpl = model, spec, len(requests), len(templates)
        self.device = next(model.parameters()).device
        prompts = subject_prompts(tok, requests, templates)
        rows = [prompt_ids(tok, p.text)[: p.subject_idx + 1] for p in prompts]
        plain = templates.index("{}")
        rank, world = part  # this process reads the batches rank, rank + world, ... (the batches of one process)
        self.rows: list[int] = []  # the rows (request × template, request-major) read here
        self.plain_requests: list[int] = []  # the requests whose plain prompt is read here, in order
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # ids, mask, last, plain
        for c, b0 in enumerate(range(0, len(rows), batch_size)):
            if c % world != rank:
                continue
            ids, mask = right_pad(rows[b0: b0 + batch_size], pad_id(tok))
            sel = [i for i, p in enumerate(prompts[b0: b0 + batch_size]) if p.template == plain]
            self.rows += range(b0, min(b0 + batch_size, len(rows)))
            self.plain_requests += [prompts[b0 + i].request for i in sel]
            self.chunks.append((ids.to(self.device), mask.to(self.device), (mask.sum(1) - 1).to(self.device),
                                torch.tensor(sel, dtype=torch.long, device=self.device)))
        self.at = 0  # the block whose input `hidden` keeps
        self.hidden: list[torch.Tensor] = []  # per chunk: (rows, width, d) input of block `at` (none: run from the
        #                                       embeddings)
        self.structs: dict[int, object] = {}  # what each block returns (tensor or tuple), for the pass-throughs
        self.versions: tuple = ()  # parameter versions of the blocks below `at` when `hidden` was kept

    def _below(self, block: int) -> tuple:
        return tuple((p.data_ptr(), p._version) for i in range(block)
                     for p in self.spec.module(self.model, "layer", i).parameters())

    def _check(self, layer: int) -> None:
        if self.hidden and layer < self.at:
            raise ValueError(f"LayerKeys: layer {layer} is below the kept block {self.at}; reads must go up")
        if self.hidden and self._below(self.at) != self.versions:
            raise ValueError(f"LayerKeys: a weight below block {self.at} changed since its inputs were kept")

    def _forward(self, c: int, sel: torch.Tensor | None, stop: str, ins: list[str], outs: list[str],
                 keep: int | None = None):
        """One chunk (rows `sel` of it, trimmed, or all) from block `at` on, until module `stop`; with `keep`, the
        input of that block (all positions) is returned too."""
        ids, mask, _last, _plain = self.chunks[c]
        hidden = self.hidden[c] if self.hidden else None
        if sel is not None:
            width = int(mask[sel].sum(1).max())
            ids, mask = ids[sel, :width], mask[sel, :width]
            hidden = hidden[sel, :width] if hidden is not None else None
        repl: dict[nn.Module, Callable] = {}
        if hidden is not None:
            for i in range(self.at):
                repl[self.spec.module(self.model, "layer", i)] = \
                    lambda *a, _o=self.structs[i], **k: _restructure(_o, a[0] if a else k["hidden_states"])
            blk = self.spec.module(self.model, "layer", self.at)
            repl[blk] = _on_hidden(blk.forward, hidden)
        # the blocks that run record what they return (the structure the pass-throughs repeat later)
        hooks = [self.spec.module(self.model, "layer", i).register_forward_hook(
            lambda _m, _a, out, i=i: self.structs.__setitem__(i, out))
            for i in range(self.spec.n_layers) if i not in self.structs]
        block_in: list[torch.Tensor] = []
        if keep is not None:
            hooks.append(self.spec.module(self.model, "layer", keep).register_forward_pre_hook(
                lambda _m, a, k: block_in.append(a[0] if a else k["hidden_states"]), with_kwargs=True))
        try:
            with override_forward(repl), capture(self.model, ins, inputs=True, outputs=False) as ci, \
                    capture(self.model, outs) as co, stop_after(self.model, stop):
                try:
                    self.model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
        finally:
            for h in hooks:
                h.remove()
        return ci, co, (block_in[0] if block_in else None)

    @torch.no_grad()
    def row_keys(self, layer: int) -> torch.Tensor:
        """The key at `layer`'s mlp_out of each row read here (`rows`), (len(rows), d_k), with the current weights.
        The input of block `layer` is kept for the next read."""
        self._check(layer)
        module = self.spec.module_name("mlp_out", layer)
        out, kept = [], []
        new = not self.hidden or layer > self.at  # keep block `layer`'s inputs from this pass
        was_training = self.model.training
        self.model.eval()
        try:
            for c, (_ids, _mask, last, _plain) in enumerate(self.chunks):
                ci, _, block_in = self._forward(c, None, module, [module], [], keep=layer if new else None)
                out.append(ci.inputs[module][torch.arange(len(last), device=self.device), last])
                if new:
                    kept.append(block_in)
        finally:
            self.model.train(was_training)
        if new:
            self.at, self.hidden = layer, kept
            self.versions = self._below(layer)
        return torch.cat(out)

    def keys(self, layer: int, groups: Sequence[int] | None = None) -> torch.Tensor:
        """k* per request at `layer`'s mlp_out, (R, d_k), averaged as `compute_keys` does (every row read here)."""
        if len(self.rows) != self.n_req * self.n_tpl:
            raise ValueError("LayerKeys.keys needs every row; a part reads `row_keys` (average with `average_keys`)")
        return average_keys(self.row_keys(layer).view(self.n_req, self.n_tpl, -1), groups)

    @torch.no_grad()
    def outputs(self, top: int, also: Sequence[str] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Output of block `top` at the subject's last token of each plain prompt read here (`plain_requests`),
        (R, d) when all are, with the current weights; with `also` (modules in blocks at or above the kept one, at or below `top`), their outputs there
        too: as `methods.memit.block_outputs`."""
        self._check(top)
        names = [self.spec.module_name("layer", top), *also]
        out: dict[str, list[torch.Tensor]] = {n: [] for n in names}  # plain rows, in request order
        was_training = self.model.training
        self.model.eval()
        try:
            for c, (_ids, mask, _last, plain) in enumerate(self.chunks):
                if not len(plain):
                    continue
                _, co, _ = self._forward(c, plain, names[0], [], names)
                last = mask[plain].sum(1) - 1
                for n in names:
                    out[n].append(co.outputs[n][torch.arange(len(plain), device=self.device), last])
        finally:
            self.model.train(was_training)
        result = tuple(torch.cat(out[n]) for n in names)
        return result if also else result[0]
