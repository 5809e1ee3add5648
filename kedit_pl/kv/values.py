"""Values: optimize one δ per request so the model predicts target_new (ROME eq. 4 / MEMIT eq. 16, "z").

For each request, δ is added at the insertion point (ROME: the MLP output of the edit layer; MEMIT: the block
output, i.e. the residual stream) at the subject's last token of every context-prefixed rewrite prompt and of
the KL ("essence") prompt "{subject} is a". The loss per request is

    mean_j NLL(target_new | x_j + p) + kl_factor · KL(P_δ[· | s is a] ‖ P[· | s is a]) + wd · ‖δ‖ / ‖v‖²

with δ projected onto the ball ‖δ‖ ≤ clamp_norm_factor · ‖v‖ after each Adam step, where v is the original
output at the insertion point on the plain rewrite prompt (template "{}"). Requests in one batch never
interact (each owns its rows), so batching them gives each the same trajectory as optimizing it alone; a
request that reaches `stop_loss` is frozen, as ROME stops its loop, and its rows leave the batch (`narrow`): the
later steps compute only the requests still optimizing.

Speed (fast=True): δ only changes the computation at and after the subject's last token, and only from the
edit layer up. So one no-grad pass caches the keys/values of every row's prefix (the tokens before the subject's
last token) for all layers and the edit block's input/output on the suffix; each optimization step then feeds
only the suffix tokens (subject's last token, the rest of the prompt, the target; one token for KL rows) with the
cached prefix as the key/value cache, the lower blocks' `forward` replaced by a pass-through and the edit block's
by "cached output + δ" (insertion at the block output) or "its original forward on the cached input" (insertion
inside the block, e.g. the MLP output: exact also for blocks with a norm after the MLP, such as Gemma 3). The
forwards are restored in a `finally`. fast=False runs the plain full forward every step (the reference).
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.hooks import (
    StopForward,
    _on_hidden,
    _restructure,
    capture,
    edit_outputs,
    override_forward,
    stop_after,
)
from kedit_pl.kv.buckets import partition
from kedit_pl.kv.keys import subject_prompts
from kedit_pl.kv.precision import compute_dtype as resolve_dtype
from kedit_pl.kv.precision import lowp_forwards
from kedit_pl.models.kv_cache import cache_kwargs, cache_layers, new_cache
from kedit_pl.models.spec import ModelSpec
from kedit_pl.tokens import encode_targets, pad_id, prompt_ids, subject_last_token

log = logging.getLogger(__name__)

KL_PROMPTS = ("{} is a",)


@dataclass
class ValueResult:
    """Per-request outcome. `target` = v + δ is MEMIT's z; ROME uses δ (see methods/rome.py)."""

    delta: torch.Tensor  # (R, d)
    v_init: torch.Tensor  # (R, d) original output at the insertion point (plain prompt, subject's last token)
    nll: torch.Tensor  # (R,) mean NLL of target_new at the final δ
    kl: torch.Tensor  # (R,) KL term (already times kl_factor)
    steps: list[int] = field(default_factory=list)  # gradient steps taken per request
    seconds: float = 0.0
    cached: int = 0  # requests whose values came from a disk cache (kv/value_cache.py), not computed
    #: (R, T, d_k) input of the edit layer's mlp_out at the subject's last token of each template's prompt: ROME's
    #: keys k(x_j + s) (eq. 3), read for free in the same pass that caches the prefix (None where not computed)
    keys: torch.Tensor | None = None

    @property
    def target(self) -> torch.Tensor:
        """The optimized value v* = v_init + δ."""
        return self.v_init + self.delta


@dataclass
class _Batch:
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor  # -100 except at target tokens of rewrite rows
    row_req: torch.Tensor  # (B,) request of each row
    edit_pos: torch.Tensor  # (B,) subject's last token of each row (δ goes there)
    kl_rows: torch.Tensor  # rows of KL prompts
    init_rows: torch.Tensor  # (R,) row whose insertion output is v_init
    pad: int = 0  # padding token id


def build_batch(tok: PreTrainedTokenizerBase, requests: list[EditRequest], templates: list[str],
                kl_prompts: tuple[str, ...] = KL_PROMPTS) -> _Batch:
    """All rewrite rows (request × template, target appended) then all KL rows, right-padded."""
    rewrite = subject_prompts(tok, requests, templates)
    tb = encode_targets(tok, [p.text for p in rewrite], [requests[p.request].target_new for p in rewrite])
    kl_ids, kl_pos, kl_req = [], [], []
    for r, req in enumerate(requests):
        for tpl in kl_prompts:
            try:
                text, idx = subject_last_token(tok, tpl, req.subject)
            except EditFailed as e:
                raise EditFailed(f"case_id={req.case_id}: {e}") from None
            kl_ids.append(prompt_ids(tok, text)), kl_pos.append(idx), kl_req.append(r)
    width = max(tb.input_ids.shape[1], max(len(x) for x in kl_ids))
    n_rw, n = len(rewrite), len(rewrite) + len(kl_ids)
    ids = torch.full((n, width), pad_id(tok), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    w0 = tb.input_ids.shape[1]
    ids[:n_rw, :w0], mask[:n_rw, :w0], labels[:n_rw, :w0] = tb.input_ids, tb.attention_mask, tb.labels
    for i, row in enumerate(kl_ids):
        ids[n_rw + i, : len(row)] = torch.tensor(row)
        mask[n_rw + i, : len(row)] = 1
    plain = templates.index("{}") if "{}" in templates else 0
    return _Batch(ids, mask, labels,
                  row_req=torch.tensor([p.request for p in rewrite] + kl_req),
                  edit_pos=torch.tensor([p.subject_idx for p in rewrite] + kl_pos),
                  kl_rows=torch.arange(n_rw, n),
                  init_rows=torch.tensor([i for i, p in enumerate(rewrite) if p.template == plain]),
                  pad=pad_id(tok))


class _FullRunner:
    """Plain forward passes of the whole batch, δ added by a hook (the reference path)."""

    def __init__(self, model: nn.Module, spec: ModelSpec, batch: _Batch, layer: int, insert: str,
                 loss_layer: int) -> None:
        self.model, self.spec = model, spec
        self.device = next(model.parameters()).device
        self.block = spec.module_name("layer", layer)
        self.insert = spec.module_name(insert, layer)
        self.key_module = spec.module_name("mlp_out", layer)  # its input at the edit position is ROME's key k
        self.keys: torch.Tensor | None = None  # (B, d_k), set by prepare
        if insert != "layer" and not self.insert.startswith(self.block + "."):
            raise ConfigError(f"insertion module {self.insert} is not inside block {self.block}")
        self.lower = [spec.module(model, "layer", i) for i in range(layer)]
        self.loss_block = spec.module_name("layer", loss_layer)
        self.rows = torch.arange(len(batch.row_req), device=self.device)
        self.req = batch.row_req.to(self.device)
        self.pos = batch.edit_pos.to(self.device)  # where δ goes, in this runner's coordinates
        self.inputs = dict(input_ids=batch.ids.to(self.device), attention_mask=batch.mask.to(self.device),
                           use_cache=False)

    def _call(self, **inputs) -> None:
        try:
            self.model(**inputs)
        except StopForward:
            pass

    def narrow(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indices in the current rows) for the following steps."""
        self.req, self.pos = self.req[keep], self.pos[keep]
        self.rows = torch.arange(len(keep), device=self.device)
        self.inputs = _take_rows(self.inputs, keep)

    @torch.no_grad()
    def prepare(self) -> torch.Tensor:
        """The original output of the insertion module at every row's subject-last token (and the keys there)."""
        with capture(self.model, [self.insert, self.key_module], inputs=True) as cap, \
                stop_after(self.model, self.block):
            self._call(**self.inputs)
        self.keys = cap.inputs[self.key_module][self.rows, self.pos]
        return cap.outputs[self.insert][self.rows, self.pos]

    def _add(self, delta: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        # δ is float32 (the optimized variable); it joins the stream in the model's dtype, its gradient returns float32
        return lambda out: out.index_put((self.rows, self.pos), delta[self.req].to(out.dtype), accumulate=True)

    def _run(self, delta: torch.Tensor, stack: ExitStack, **inputs) -> torch.Tensor:
        cap = stack.enter_context(capture(self.model, [self.loss_block], detach=False))
        stack.enter_context(stop_after(self.model, self.loss_block))
        self._call(**inputs)
        return cap.outputs[self.loss_block]

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """Output of the loss-layer block with δ inserted."""
        with ExitStack() as stack:
            stack.enter_context(edit_outputs(self.model, {self.insert: self._add(delta)}))
            return self._run(delta, stack, **self.inputs)

    def gather(self, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Hidden states at positions given in the batch's (row, token) coordinates."""
        return h[rows, cols]


@dataclass
class _Bucket:
    """Rows of similar suffix length that run as one forward, trimmed to their own longest prefix and suffix."""

    rows: torch.Tensor  # (n,) indices into the runner's current rows
    ids: torch.Tensor  # (n, w) suffix token ids
    pre_mask: torch.Tensor  # (n, p) which cached prefix slots are real
    suf_mask: torch.Tensor  # (n, w)
    positions: torch.Tensor  # (n, w)
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # prefix keys/values per layer, (n, heads, p, head_dim)
    block_in: torch.Tensor  # (n, w, d) the edit block's input on the suffix
    block_out: torch.Tensor  # (n, w, d) its output

    def inputs(self) -> dict:
        return dict(input_ids=self.ids, attention_mask=torch.cat([self.pre_mask, self.suf_mask], 1),
                    position_ids=self.positions, use_cache=True)

    def take(self, sel: torch.Tensor, rows: torch.Tensor) -> "_Bucket":
        """Rows `sel` (local indices) only, renumbered `rows`, with the padding they no longer need trimmed."""
        p, w = int(self.pre_mask[sel].sum(1).max()), int(self.suf_mask[sel].sum(1).max())
        return _Bucket(rows, self.ids[sel, :w], self.pre_mask[sel, :p], self.suf_mask[sel, :w],
                       self.positions[sel, :w], [(k[sel, :, :p], v[sel, :, :p]) for k, v in self.kv],
                       self.block_in[sel, :w], self.block_out[sel, :w])


#: an extra forward (+ backward) costs about as much as this many more tokens in one (Python and dispatch);
#: `buckets.partition` weighs it against the padded tokens a split saves
GROUP_OVERHEAD_TOKENS = 32


class _FastRunner(_FullRunner):
    """Recompute only what δ changes: the suffix of each row (from the subject's last token on) in the blocks
    from the edit layer up. The prefix's keys/values are cached once for every layer; lower blocks become
    pass-throughs and the edit block returns its cached output (+ δ), or reruns on its cached input when δ goes
    inside it. Rows run in groups of similar prefix and suffix length (kv/buckets.py), so that few padded
    tokens are computed."""

    def __init__(self, model: nn.Module, spec: ModelSpec, batch: _Batch, layer: int, insert: str,
                 loss_layer: int) -> None:
        super().__init__(model, spec, batch, layer, insert, loss_layer)
        start = batch.edit_pos
        has_label = batch.labels != -100
        idx = torch.arange(batch.ids.shape[1]).expand_as(batch.ids)
        end = torch.where(has_label.any(1), (idx * has_label).max(1).values, start) + 1  # last needed token + 1
        n, wp, ws = len(start), int(start.max()), int((end - start).max())
        pad = batch.pad
        pre_ids, pre_mask = torch.full((n, wp), pad), torch.zeros((n, wp), dtype=torch.long)
        suf_ids, suf_mask = torch.full((n, ws), pad), torch.zeros((n, ws), dtype=torch.long)
        for b in range(n):
            s, e = int(start[b]), int(end[b])
            pre_ids[b, :s], pre_mask[b, :s] = batch.ids[b, :s], 1
            suf_ids[b, : e - s], suf_mask[b, : e - s] = batch.ids[b, s:e], 1
        d = self.device
        self.start, self.suf_len = start.to(d), (end - start).to(d)
        self.pos = torch.zeros_like(self.start)  # δ goes at the first suffix token
        self.prefix = dict(input_ids=pre_ids.to(d), attention_mask=pre_mask.to(d), use_cache=True) if wp else None
        self.suffix = dict(input_ids=suf_ids.to(d), attention_mask=torch.cat([pre_mask, suf_mask], 1).to(d),
                           position_ids=(start.unsqueeze(1) + torch.arange(ws)).to(d), use_cache=True)
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.structs: list = []
        self.buckets: list[_Bucket] = []

    def _prefix_kv(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of every row's prefix for all layers up to the loss layer, (n, heads, wp, head_dim) each,
        padded slots zero (never NaN). Rows run in groups of similar prefix length."""
        ids, mask = self.prefix["input_ids"], self.prefix["attention_mask"]
        groups = partition(self.start.tolist(), GROUP_OVERHEAD_TOKENS)
        full: list[tuple[torch.Tensor, torch.Tensor]] = []
        for g in groups:
            rows = torch.tensor(g, device=self.device)
            p = int(self.start[rows].max())
            if p == 0:
                continue
            cache = new_cache(self.model)
            with stop_after(self.model, self.loss_block):
                self._call(input_ids=ids[rows, :p], attention_mask=mask[rows, :p], use_cache=True,
                           **cache_kwargs(self.model, cache))
            keep = mask[rows, :p].bool()[:, None, :, None]
            layers = cache_layers(cache)
            if not full:
                full = [(k.new_zeros((len(mask), k.shape[1], mask.shape[1], k.shape[3])),
                         v.new_zeros((len(mask), v.shape[1], mask.shape[1], v.shape[3]))) for k, v in layers]
            for (K, V), (k, v) in zip(full, layers):
                K[rows, :, :p], V[rows, :, :p] = torch.where(keep, k, 0.0), torch.where(keep, v, 0.0)
        return full

    @torch.no_grad()
    def prepare(self) -> torch.Tensor:
        if self.prefix is not None:
            self.kv = self._prefix_kv()
        blocks = self.lower + [self.model.get_submodule(self.block)]
        structs: dict[int, object] = {}
        hooks = [m.register_forward_hook(lambda _m, _a, out, i=i: structs.__setitem__(i, out))
                 for i, m in enumerate(blocks)]
        past = cache_kwargs(self.model, new_cache(self.model, self.kv)) if self.kv else {}
        try:
            with capture(self.model, [self.insert, self.block, self.key_module], inputs=True) as cap, \
                    stop_after(self.model, self.block):
                self._call(**self.suffix, **past)
        finally:
            for h in hooks:
                h.remove()
        # of the lower blocks' outputs only the structure (tensor, or tuple with extras) is reused
        self.structs = [structs.get(i) for i in range(len(blocks))]
        self.buckets = self._buckets(cap.inputs[self.block], cap.outputs[self.block])
        self.kv, self.suffix = [], {}  # now held by the buckets
        self.keys = cap.inputs[self.key_module][self.rows, self.pos]
        return cap.outputs[self.insert][self.rows, self.pos]

    def _buckets(self, block_in: torch.Tensor, block_out: torch.Tensor) -> list[_Bucket]:
        mask, n_pre = self.suffix["attention_mask"], self.prefix["input_ids"].shape[1] if self.prefix else 0
        whole = _Bucket(self.rows, self.suffix["input_ids"], mask[:, :n_pre], mask[:, n_pre:],
                        self.suffix["position_ids"], self.kv, block_in, block_out)
        return [whole.take(torch.tensor(g, device=self.device), torch.tensor(g, device=self.device))
                for g in partition(self.suf_len.tolist(), GROUP_OVERHEAD_TOKENS)]

    def _bucket_hidden(self, bk: _Bucket, delta: torch.Tensor) -> torch.Tensor:
        """The loss block's output on one bucket's suffix, δ of each row's request added at its first token."""
        local = torch.arange(len(bk.rows), device=self.device)
        first, d_rows = torch.zeros_like(local), delta[self.req[bk.rows]]

        def add(out: torch.Tensor) -> torch.Tensor:
            return out.index_put((local, first), d_rows.to(out.dtype), accumulate=True)

        repl: dict[nn.Module, Callable] = {}
        for m, out in zip(self.lower, self.structs):
            repl[m] = lambda *a, _o=out, **k: _restructure(_o, a[0] if a else k["hidden_states"])
        blk = self.model.get_submodule(self.block)
        with ExitStack() as stack:
            if self.insert == self.block:
                repl[blk] = lambda *a, **k: _restructure(self.structs[-1], add(bk.block_out))
            else:
                repl[blk] = _on_hidden(blk.forward, bk.block_in)
                stack.enter_context(edit_outputs(self.model, {self.insert: add}))
            stack.enter_context(override_forward(repl))
            past = cache_kwargs(self.model, new_cache(self.model, bk.kv)) if bk.kv else {}
            return self._run(delta, stack, **bk.inputs(), **past)

    def hidden(self, delta: torch.Tensor) -> torch.Tensor:
        """(rows, longest suffix, d): each bucket's output, padded and put back in row order."""
        outs = [self._bucket_hidden(bk, delta) for bk in self.buckets]
        if len(outs) == 1:
            return outs[0]
        width = max(o.shape[1] for o in outs)
        h = torch.cat([F.pad(o, (0, 0, 0, width - o.shape[1])) for o in outs])
        return h[torch.argsort(torch.cat([bk.rows for bk in self.buckets]))]

    def gather(self, h: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return h[rows, cols - self.start[rows]]

    def narrow(self, keep: torch.Tensor) -> None:
        kept = torch.zeros(len(self.req), dtype=torch.bool, device=self.device)
        kept[keep] = True
        new_index = kept.cumsum(0) - 1
        super().narrow(keep)
        self.start, self.suf_len = self.start[keep], self.suf_len[keep]
        self.buckets = [bk.take(sel, new_index[bk.rows[sel]])
                        for bk in self.buckets for sel in [kept[bk.rows].nonzero().flatten()] if len(sel)]


def _take_rows(inputs: dict, keep: torch.Tensor) -> dict:
    """Forward kwargs with every tensor restricted to rows `keep`."""
    return {k: v[keep] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@dataclass
class _Rows:
    """Where the loss reads, in the current rows' coordinates (rebuilt when done requests leave the batch)."""

    lab: torch.Tensor  # (B, T) labels
    req: torch.Tensor  # (B,) request of each row
    kl: torch.Tensor  # (B,) bool: KL row
    edit_pos: torch.Tensor  # (B,) subject's last token

    def __post_init__(self) -> None:
        self.tr, self.tc = (self.lab != -100).nonzero(as_tuple=True)  # target positions
        self.n_tok = (self.lab != -100).sum(1).clamp_min(1)
        self.kl_rows = self.kl.nonzero().flatten()
        self.kl_pos, self.kl_req = self.edit_pos[self.kl_rows], self.req[self.kl_rows]

    def take(self, keep: torch.Tensor) -> "_Rows":
        return _Rows(self.lab[keep], self.req[keep], self.kl[keep], self.edit_pos[keep])


def _logprobs(model: nn.Module, spec: ModelSpec, h: torch.Tensor) -> torch.Tensor:
    """log softmax(lm_head(final_norm(h))) for selected hidden states (N, d) -> (N, V)."""
    logits = model.get_submodule(spec.lm_head)(model.get_submodule(spec.final_norm)(h)).float()
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def optimize_values(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, requests: list[EditRequest],
                    templates: list[str], layer: int, *, insert: str = "mlp_out", loss_layer: int | None = None,
                    steps: int = 20, lr: float = 0.5, weight_decay: float = 0.5, clamp_norm_factor: float = 4.0,
                    kl_factor: float = 0.0625, kl_prompts: tuple[str, ...] = KL_PROMPTS, stop_loss: float = 5e-2,
                    fast: bool = True, max_rows: int | None = None, compute_dtype: str = "float32") -> ValueResult:
    """Optimize δ for every request (batched; groups of at most `max_rows` rows per forward).

    `compute_dtype="bfloat16"` runs the projections of the blocks above the edit layer and the LM head in bf16
    (kv/precision.py); everything else, and every weight, stays as it is."""
    if not requests:
        raise ValueError("optimize_values needs at least one request")
    dtype = resolve_dtype(compute_dtype)
    per_req = len(templates) + len(kl_prompts)
    group = len(requests) if not max_rows else max(1, max_rows // per_req)
    starts = range(0, len(requests), group)
    parts: list[ValueResult] = []
    for i in starts:
        parts.append(_optimize_group(model, tok, spec, requests[i: i + group], templates, layer, insert,
                                     spec.n_layers - 1 if loss_layer is None else loss_layer, steps, lr, weight_decay,
                                     clamp_norm_factor, kl_factor, kl_prompts, stop_loss, fast, dtype))
        if len(starts) > 1:  # long runs (MEMIT over hundreds of requests) show where they are
            done, spent = i + len(parts[-1].steps), sum(p.seconds for p in parts)
            log.info("values: %d/%d requests optimized, %.0f s, mean %.1f steps; about %.0f s left", done,
                     len(requests), spent, sum(sum(p.steps) for p in parts) / done,
                     spent / done * (len(requests) - done))
    return ValueResult(torch.cat([p.delta for p in parts]), torch.cat([p.v_init for p in parts]),
                       torch.cat([p.nll for p in parts]), torch.cat([p.kl for p in parts]),
                       sum((p.steps for p in parts), []), sum(p.seconds for p in parts),
                       keys=torch.cat([p.keys for p in parts]))


def _upper(model: nn.Module, spec: ModelSpec, layer: int, loss_layer: int) -> list[nn.Module]:
    """What runs above the insertion point: the blocks after the edit layer up to the loss layer, and the LM head.
    (The edit block itself stays in float32: v and the keys are read there.)"""
    return [spec.module(model, "layer", i) for i in range(layer + 1, loss_layer + 1)] + \
        [model.get_submodule(spec.lm_head)]


def warm_compute_dtype(model: nn.Module, spec: ModelSpec, layer: int, loss_layer: int | None,
                       compute_dtype: str) -> None:
    """Make the low-precision weight copies now, so that the first timed call does not pay for them (they stay
    valid for every later call while the weights are unchanged, kv/precision.py)."""
    dtype = resolve_dtype(compute_dtype)
    lowp_forwards(_upper(model, spec, layer, spec.n_layers - 1 if loss_layer is None else loss_layer), dtype)


@contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Plain matmul + softmax attention ("eager") for the duration of a call, on CPU: at the value optimization's
    shapes (a few query tokens per row over a short cached prefix) PyTorch's fused CPU attention kernels cost more
    than the attention itself (ROME, smollm2: 11 % of an edit's time, against about 2 % eager). Every Hugging Face
    decoder has the eager path; its masks follow the same setting. Restored on exit."""
    config = getattr(model, "config", None)
    old = getattr(config, "_attn_implementation", None)
    if old in (None, "eager") or next(model.parameters()).device.type != "cpu":
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = old


def _optimize_group(model, tok, spec, requests, templates, layer, insert, loss_layer, steps, lr, weight_decay,
                    clamp_norm_factor, kl_factor, kl_prompts, stop_loss, fast, dtype) -> ValueResult:
    start = time.perf_counter()
    if not layer <= loss_layer < spec.n_layers:
        raise ConfigError(f"loss_layer {loss_layer} must lie in [{layer}, {spec.n_layers - 1}]")
    batch = build_batch(tok, requests, templates, kl_prompts)
    with override_forward(lowp_forwards(_upper(model, spec, layer, loss_layer), dtype)), _eager_attention(model):
        res = _optimize_batch(model, spec, requests, batch, layer, insert, loss_layer, steps, lr, weight_decay,
                              clamp_norm_factor, kl_factor, stop_loss, fast)
    res.seconds = time.perf_counter() - start
    return res


def _optimize_batch(model, spec, requests, batch, layer, insert, loss_layer, steps, lr, weight_decay,
                    clamp_norm_factor, kl_factor, stop_loss, fast) -> ValueResult:
    """Adam on δ for the requests of one batch (ROME eq. 4 / MEMIT eq. 16, see the module docstring)."""
    run = (_FastRunner if fast else _FullRunner)(model, spec, batch, layer, insert, loss_layer)
    n_req = len(requests)
    v_all = run.prepare()
    v_init = v_all[batch.init_rows.to(run.device)].detach()
    dev = run.device
    n_rw = len(batch.row_req) - len(batch.kl_rows)  # rewrite rows come first, request-major (build_batch)
    keys = run.keys[:n_rw].detach().reshape(n_req, n_rw // n_req, -1)
    kl_mask = torch.zeros(len(batch.row_req), dtype=torch.bool)
    kl_mask[batch.kl_rows] = True
    rows = _Rows(batch.labels.to(dev), batch.row_req.to(dev), kl_mask.to(dev), batch.edit_pos.to(dev))
    ones = torch.ones(len(rows.req), device=dev)
    rw = ~rows.kl & (rows.lab != -100).any(1)
    rows_per_req = torch.zeros(n_req, device=dev).index_add_(0, rows.req[rw], ones[rw])
    kl_per_req = torch.zeros(n_req, device=dev).index_add_(0, rows.kl_req, ones[rows.kl_rows])

    # δ, its Adam state and its norms in float32 whatever the model's dtype (half-precision Adam loses small steps,
    # and its eps underflows in float16)
    delta = torch.zeros_like(v_init, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    max_norm = clamp_norm_factor * v_init.float().norm(dim=-1)
    v_sq = v_init.float().norm(dim=-1) ** 2
    kl_init = None  # (KL rows of the current batch, V): the unedited distribution
    done = torch.zeros(n_req, dtype=torch.bool, device=dev)
    nll_out, kl_out = torch.zeros(n_req, device=dev), torch.zeros(n_req, device=dev)
    taken = [steps - 1] * n_req
    for it in range(steps):
        h = run.hidden(delta)
        # one LM-head pass for the target positions and the KL rows (the head's weight is read once per step)
        lp_all = _logprobs(model, spec, torch.cat([run.gather(h, rows.tr, rows.tc),
                                                   run.gather(h, rows.kl_rows, rows.kl_pos)]))
        lp, kl_lp = lp_all[: len(rows.tr)], lp_all[len(rows.tr):]
        lp = lp.gather(-1, rows.lab[rows.tr, rows.tc].unsqueeze(-1)).squeeze(-1)
        nll_row = torch.zeros(len(rows.lab), device=dev).index_add(0, rows.tr, -lp) / rows.n_tok
        nll = torch.zeros(n_req, device=dev).index_add(0, rows.req, nll_row) / rows_per_req
        if kl_init is None:
            kl_init = kl_lp.detach()
        kl_each = F.kl_div(kl_init, kl_lp, log_target=True, reduction="none").sum(-1)  # KL(P_δ ‖ P)
        kl = kl_factor * torch.zeros(n_req, device=dev).index_add(0, rows.kl_req, kl_each) / kl_per_req
        wd = weight_decay * delta.norm(dim=-1) / v_sq
        loss = nll + kl + wd  # rows of requests that left the batch contribute nothing (their entries unused)
        if not torch.isfinite(loss[~done]).all():
            bad = [requests[i].case_id for i in (~torch.isfinite(loss) & ~done).nonzero().flatten().tolist()]
            raise EditFailed(f"value optimization: non-finite loss at step {it} for case_id(s) {bad}")
        active = ~done
        nll_out[active], kl_out[active] = nll.detach()[active], kl.detach()[active]
        newly = (loss.detach() < stop_loss) & active
        for i in newly.nonzero().flatten().tolist():
            taken[i] = it
        done |= newly
        if bool(done.all()) or it == steps - 1:
            break
        opt.zero_grad()
        loss[~done].sum().backward()
        frozen = delta.detach().clone()
        opt.step()
        with torch.no_grad():
            delta[done] = frozen[done]
            norm = delta.norm(dim=-1)
            scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
            delta.mul_(scale.unsqueeze(-1))
        if bool(newly.any()):  # finished requests leave the batch: later steps skip their rows
            keep = (~done[rows.req]).nonzero().flatten()
            kl_init = kl_init[(~done[rows.kl_req]).nonzero().flatten()]
            run.narrow(keep)
            rows = rows.take(keep)
    return ValueResult(delta.detach(), v_init, nll_out, kl_out, taken, keys=keys)
