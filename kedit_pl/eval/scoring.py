"""Scoring prompts against targets with a (possibly edited) model, batched across records.

For every evaluation prompt we measure, for target_new and target_true, the mean per-token NLL and
the teacher-forced top-1 token accuracy. Metrics (ES/PS/NS, ...) are pure functions of these
numbers, in `metrics.py`.

Two exact ways to get the numbers:
- `score_pairs_full`: one forward pass per (prompt, target) row; works with any `LogitsFn`.
- `score_prefixed`: each distinct prompt runs once, its key/value cache is kept, and every target of that
  prompt is scored as a continuation from it. A target's first token is predicted by the prompt's last
  position, so single-token targets need no second pass at all.
`score_pairs` picks the second when the logits function says, per prompt, which model continues it from which
ids (`prefixes`, see `PrefixFn`): the plain model (`ModelLogits`) from the prompt itself; SERAC routes by the
prompt, so it can say so too (base model from the prompt, or counterfactual model from `[edit] [prompt]`).
"""
from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.models.kv_cache import cache_kwargs, cache_layers, full_attention_cache, new_cache, output_cache
from kedit_pl.tokens import encode_targets, label_logprobs, left_pad, prompt_ids, right_pad, target_ids

#: prompt groups and which targets each is scored against
GROUPS = ("rewrite", "paraphrase", "neighborhood")


@dataclass(frozen=True)
class TargetScore:
    """Teacher-forced score of one target after one prompt."""
    nll: float  # mean per-token negative log-likelihood of the target
    acc: float  # fraction of target tokens that are the top-1 prediction (teacher forced)


def group_prompts(req: EditRequest) -> dict[str, list[str]]:
    """The record's CounterFact prompts by group: rewrite, paraphrase, neighborhood."""
    return {"rewrite": [req.rewrite], "paraphrase": list(req.paraphrases), "neighborhood": list(req.neighborhood)}


#: (input_ids, attention_mask, prompt_lengths, keep) -> logits (B, T', V). Prompt lengths let routing methods
#: (SERAC) decide on the prompt alone, so both targets of a prompt are scored by the same route. `keep` (None =
#: all) says only the last `keep` positions are read: a function may return just those (T' = keep) to skip the
#: LM head elsewhere, which is most of the cost for large vocabularies (Gemma 3: 262k), or all T positions.
LogitsFn = Callable[..., torch.Tensor]


@contextmanager
def contiguous_head(model: nn.Module) -> Iterator[None]:
    """With `logits_to_keep`, the model slices its hidden states (a strided view); CPU matmuls on such views are
    several times slower than on a contiguous copy (measured 3.5 s vs 0.5 s for Gemma 3's 262k-row head), so
    the LM head gets a contiguous copy while this is active."""
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(),) + tuple(args[1:]))
    try:
        yield
    finally:
        hook.remove()


def forward_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """Logits of a plain forward pass; with `keep`, the LM head runs on the last `keep` positions only."""
    if keep is None:
        return model(input_ids=ids, attention_mask=mask).logits
    with contiguous_head(model):
        return model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits


#: prompts' token ids -> for each, (the model that continues it, the ids it continues from). Prompts routed to
#: one model from ids of one length share a forward pass.
PrefixFn = Callable[[list[list[int]]], list[tuple[nn.Module, list[int]]]]


@dataclass(frozen=True)
class RoutedLogits:
    """A `LogitsFn` that also routes by prompt alone (`prefixes`), so scoring may use the prompt-cache path."""

    logits: LogitsFn
    prefixes: PrefixFn

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.logits(*args, **kwargs)


@dataclass(frozen=True)
class ModelLogits:
    """The default `LogitsFn`: a plain forward pass of `model`. Scoring recognizes it (the logits are a pure
    function of the weights), so it may reuse a prompt's key/value cache and cache pre-edit scores on disk."""

    model: nn.Module

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor, prompt_lengths: list[int] | None = None,
                 keep: int | None = None) -> torch.Tensor:
        return forward_logits(self.model, ids, mask, keep)

    def prefixes(self, rows: list[list[int]]) -> list[tuple[nn.Module, list[int]]]:
        """Every prompt is continued by the model itself, from its own ids."""
        return [(self.model, r) for r in rows]


def model_logits(model: nn.Module) -> LogitsFn:
    """The default way to get logits: a plain forward pass."""
    return ModelLogits(model)


def last_positions(batch) -> int:
    """How many trailing positions of a right-padded batch hold every target label (the LM head needs no more)."""
    return batch.input_ids.shape[1] - min(batch.prompt_lengths) + 1


def _scores(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: summed label log-probability, number of correct top-1 labels, number of labels (-100 ignored)."""
    mask = labels != -100
    return label_logprobs(logits, labels).sum(-1), ((logits.argmax(-1) == labels) & mask).sum(-1), mask.sum(-1)


def score_pairs(logits_fn: LogitsFn, tok: PreTrainedTokenizerBase, prompts: list[str], targets: list[str],
                batch_size: int = 64, device: torch.device | str = "cpu") -> list[TargetScore]:
    """Mean NLL and top-1 accuracy of each target after its prompt (from the prompt's cache when possible)."""
    prefixes = getattr(logits_fn, "prefixes", None)
    if prefixes is not None:
        return score_prefixed(prefixes, tok, prompts, targets, batch_size, device)
    return score_pairs_full(logits_fn, tok, prompts, targets, batch_size, device)


@torch.no_grad()
def score_pairs_full(logits_fn: LogitsFn, tok: PreTrainedTokenizerBase, prompts: list[str], targets: list[str],
                     batch_size: int = 64, device: torch.device | str = "cpu") -> list[TargetScore]:
    """`score_pairs` with one forward pass over prompt + target per pair (any `LogitsFn`)."""
    out: list[TargetScore] = []
    # batch prompts of equal token length together: little padding, and the LM head then runs on few positions
    n_prompt = [len(prompt_ids(tok, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (n_prompt[i], len(targets[i])))
    results: dict[int, TargetScore] = {}
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = encode_targets(tok, [prompts[i] for i in idx], [targets[i] for i in idx]).to(device)
        keep = min(last_positions(batch), batch.input_ids.shape[1])
        logits = logits_fn(batch.input_ids, batch.attention_mask, batch.prompt_lengths, keep)[:, -keep:]
        lp, correct, n = _scores(logits, batch.labels[:, -keep:])
        n = n.clamp_min(1)
        for j, i in enumerate(idx):
            results[i] = TargetScore(float(-lp[j] / n[j]), float(correct[j] / n[j]))
    for i in range(len(prompts)):
        out.append(results[i])
    return out


@torch.no_grad()
def score_prefixed(prefixes: PrefixFn, tok: PreTrainedTokenizerBase, prompts: list[str], targets: list[str],
                   batch_size: int = 64, device: torch.device | str = "cpu") -> list[TargetScore]:
    """`score_pairs` with one pass per distinct prompt, each target continuing from the prompt's KV cache.

    `prefixes` says which model continues each prompt from which ids. Prompts of one model share batches
    (sorted by length, so little padding). The prefixes are left-padded, with position ids counted from each
    row's first real token, so every real token sits at the position and attends to the tokens it has in the
    prefix + target row. Pass 1 returns the prefixes' last-position logits, which predict every target's first
    token; pass 2 feeds target tokens 0..n-2 of the targets longer than one token, from the cache repeated per
    target (`DynamicCache.reorder_cache`), right-padded, and reads the rest.
    """
    unique = list(dict.fromkeys(prompts))
    t_ids = {t: target_ids(tok, t) for t in dict.fromkeys(targets)}
    wanted: dict[str, list[int]] = {}  # prompt -> indices of its (prompt, target) pairs
    for i, p in enumerate(prompts):
        wanted.setdefault(p, []).append(i)
    routes = dict(zip(unique, prefixes([prompt_ids(tok, p) for p in unique])))
    models = {id(m): m for m, _ in routes.values()}
    groups: dict[int, list[str]] = {}  # model -> its prompts, shortest prefix first
    for p in sorted(unique, key=lambda p: len(routes[p][1])):
        groups.setdefault(id(routes[p][0]), []).append(p)
    lp_sum = torch.zeros(len(prompts), dtype=torch.float64)
    n_ok = torch.zeros(len(prompts), dtype=torch.float64)
    for model_id, members in groups.items():
        for s in range(0, len(members), batch_size):
            group = members[s:s + batch_size]
            row = {p: r for r, p in enumerate(group)}
            pairs = [i for p in group for i in wanted[p]]
            _score_group(models[model_id], [routes[p][1] for p in group], [row[prompts[i]] for i in pairs],
                         [t_ids[targets[i]] for i in pairs], pairs, lp_sum, n_ok, device)
    lengths = [len(t_ids[t]) for t in targets]
    return [TargetScore(float(-lp_sum[i] / lengths[i]), float(n_ok[i] / lengths[i])) for i in range(len(prompts))]


#: rows sharing at least this many leading tokens run them once (`prefill`): IKE's ~1,000 tokens of demonstrations
#: before each of a record's prompts, SERAC's `[edit]` before in-scope ones
MIN_SHARED_PREFIX = 32


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Leading tokens common to every row, leaving each row at least its last token."""
    n = max(min(len(r) for r in rows) - 1, 0)
    first = rows[0][:n]
    for r in rows[1:]:
        n = _common_length(first[:n], r)
    return n


def prefix_groups(rows: list[list[int]]) -> list[tuple[list[int], int]]:
    """Rows grouped by their first `MIN_SHARED_PREFIX` tokens (one IKE record's prompts share its ~1,000-token
    context; different records' contexts differ from their first demonstration on): [(row indices, leading tokens
    all of them share)], the length 0 for a group that shares fewer than `MIN_SHARED_PREFIX`."""
    by_head: dict[tuple, list[int]] = {}
    for i, r in enumerate(rows):
        by_head.setdefault(tuple(r[:MIN_SHARED_PREFIX]) if len(r) > MIN_SHARED_PREFIX else ("own", i), []).append(i)
    out = []
    for idx in by_head.values():
        n = shared_prefix_length([rows[i] for i in idx]) if len(idx) > 1 else 0
        out.append((idx, n if n >= MIN_SHARED_PREFIX else 0))
    return out


@torch.no_grad()
def prefill(model: nn.Module, rows: list[list[int]], pad: int, device: torch.device | str,
            last_only: bool = False, share: bool | None = None) -> tuple[object, torch.Tensor]:
    """One forward over the token rows, left-padded (each row's last token in the last column, position ids from
    its first real token), with the cache kept: (model output, attention mask).

    Rows that share a prefix of `MIN_SHARED_PREFIX` tokens or more run it once, as one row whose cache is then
    repeated for every row of the group (`prefix_groups`; from the active `PrefixStore` where it holds it, which
    also serves a row that shares its prefix with no other row of the batch). Their
    rest follows, left-padded after it: the padding then sits between prefix and rest, masked. Several groups
    (several IKE records) share one batch: each group's prefix cache is left-padded to the longest, masked.
    Only where every cache layer keeps all positions: a sliding window (Gemma 3's local layers) would count the
    padding between prefix and rest as positions. Not while a module of the model carries forward hooks: a hook
    may read the prompt as one pass (GRACE looks up the key of its last token when no cache is given); `share`
    overrides that test. `last_only`: the LM head on the last position only."""
    keep = {"logits_to_keep": 1} if last_only else {}
    share = (not hooked(model) if share is None else share) and full_attention_cache(model)
    groups = prefix_groups(rows) if share else []
    store = _STORE.get()
    if store is not None:  # a row alone (a record's one portability question) may start with a stored prefix
        groups = [(idx, n or store.longest(model, rows[idx[0]][:-1])[0]) for idx, n in groups]
    shared = [(idx, n) for idx, n in groups if n]
    if not shared:
        ids, mask = (t.to(device) for t in left_pad(rows, pad))
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep), mask
    if len(groups) == 1:  # one prefix: its cache repeated for every row
        n = shared[0][1]
        cache = _prefix_cache(model, rows[0][:n], device)
        cache.reorder_cache(torch.zeros(len(rows), dtype=torch.long, device=device))
        heads = [n] * len(rows)
    else:
        cache, heads = _batched_prefixes(model, rows, shared, device)
    width = max(heads)
    head_mask = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    for b, n in enumerate(heads):
        head_mask[b, width - n:] = 1
    ids, tail_mask = (t.to(device) for t in left_pad([r[n:] for r, n in zip(rows, heads)], pad))
    mask = torch.cat([head_mask, tail_mask], 1)
    pos = torch.tensor(heads, device=device)[:, None] + (tail_mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep,
                **cache_kwargs(model, cache))
    return out, mask


def _batched_prefixes(model: nn.Module, rows: list[list[int]], shared: list[tuple[list[int], int]],
                      device: torch.device | str) -> tuple[object, list[int]]:
    """One cache for rows of several prefix groups, and each row's prefix length: each group's prefix read once,
    left-padded to the longest (zeros, masked by the caller); rows of no group get padding only (length 0)."""
    width = max(n for _, n in shared)
    heads = [0] * len(rows)
    layers = None
    for idx, n in shared:
        kv = cache_layers(_prefix_cache(model, rows[idx[0]][:n], device))
        if layers is None:
            layers = [(k.new_zeros(len(rows), *k.shape[1:-2], width, k.shape[-1]),
                       v.new_zeros(len(rows), *v.shape[1:-2], width, v.shape[-1])) for k, v in kv]
        at = torch.tensor(idx, device=device)
        for (K, V), (k, v) in zip(layers, kv):
            K[at, ..., width - n:, :] = k
            V[at, ..., width - n:, :] = v
        for i in idx:
            heads[i] = n
    return new_cache(model, layers), heads


class PrefixStore:
    """Key/value caches of token prefixes that models have read, for `prefill` to start from (most recent last,
    at most `max_mb` in all). Valid only while the models' weights stay as they were: see `reuse_prefixes`."""

    def __init__(self, max_mb: float = 1024) -> None:
        self.max_bytes = float(max_mb) * 2**20
        self.entries: OrderedDict[tuple[int, tuple[int, ...]], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()

    def nbytes(self) -> int:
        """Bytes the stored keys and values hold."""
        return sum(k.nbytes + v.nbytes for kv in self.entries.values() for k, v in kv)

    def longest(self, model: nn.Module, prefix: list[int]) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """(m, per-layer keys/values of `prefix[:m]`) for the longest m that a stored prefix of `model` shares with
        `prefix`; (0, []) when none shares `MIN_SHARED_PREFIX` tokens."""
        best, found = 0, None
        for (mid, tokens), kv in self.entries.items():
            if mid != id(model):
                continue
            m = _common_length(tokens, prefix)
            if m > best:
                best, found = m, (mid, tokens)
        if found is None or best < MIN_SHARED_PREFIX:
            return 0, []
        self.entries.move_to_end(found)
        return best, [(k[..., :best, :], v[..., :best, :]) for k, v in self.entries[found]]

    def put(self, model: nn.Module, prefix: list[int], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep `prefix`'s keys/values (dropping stored prefixes it extends, then the oldest beyond the budget)."""
        key = (id(model), tuple(prefix))
        for old in [e for e in self.entries if e[0] == key[0] and len(e[1]) <= len(prefix)
                    and e[1] == key[1][:len(e[1])]]:
            del self.entries[old]
        self.entries[key] = kv
        while len(self.entries) > 1 and self.nbytes() > self.max_bytes:
            self.entries.popitem(last=False)


_STORE: ContextVar[PrefixStore | None] = ContextVar("kedit_pl_prefix_store", default=None)


@contextmanager
def reuse_prefixes(store: PrefixStore | None) -> Iterator[PrefixStore | None]:
    """Within the block, `prefill` starts shared prefixes from what `store` holds and adds what it reads (None: no
    reuse). The caller guarantees that no model's weights change inside the block (the callback opens one per
    edited state, or one per run for a method whose routes never change: IKE, SERAC)."""
    token = _STORE.set(store)
    try:
        yield store
    finally:
        _STORE.reset(token)


def _common_length(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@torch.no_grad()
def _prefix_cache(model: nn.Module, prefix: list[int], device: torch.device | str):
    """The cache after `model` read `prefix` (one row): from the active `PrefixStore` where it holds a start of
    it, the rest run on top (positions go on from the stored part); then stored. Full-attention caches only
    (`prefill` checks)."""
    store = _STORE.get()
    m, kv = store.longest(model, prefix) if store is not None else (0, [])
    if m == len(prefix):
        return new_cache(model, kv)
    cache = new_cache(model, kv) if m else None
    rest = torch.tensor([prefix[m:]], device=device)
    extra = {"position_ids": torch.arange(m, len(prefix), device=device)[None]} if m else {}
    cache = output_cache(model(input_ids=rest, use_cache=True, logits_to_keep=1, **extra,
                               **cache_kwargs(model, cache)))
    if store is not None:
        store.put(model, prefix, cache_layers(cache))
    return cache


def hooked(model: nn.Module) -> bool:
    """Whether any module of `model` carries a forward (pre-)hook."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def _score_group(model: nn.Module, rows: list[list[int]], owner: list[int], tgts: list[list[int]], pairs: list[int],
                 lp_sum: torch.Tensor, n_ok: torch.Tensor, device: torch.device | str) -> None:
    """Score `tgts` (pair j continues prompt row `owner[j]`) into `lp_sum` / `n_ok` at index `pairs[j]`."""
    share = not hooked(model)  # before contiguous_head's own hook
    with contiguous_head(model):
        out, mask = prefill(model, rows, 0, device, last_only=True, share=share)
    first = torch.tensor([t[0] for t in tgts], device=device)[:, None]
    at = torch.tensor(owner, device=device)
    lp, ok, _ = _scores(out.logits[:, -1:][at], first)
    more = [j for j, t in enumerate(tgts) if len(t) > 1]
    if more:  # targets of 2+ tokens: tokens 0..n-2 continue the cached prompt and predict tokens 1..n-1
        cache = output_cache(out)
        cache.reorder_cache(at[more])
        cont, cont_mask = right_pad([tgts[j][:-1] for j in more], 0)
        labels, _ = right_pad([tgts[j][1:] for j in more], -100)
        cont, cont_mask, labels = cont.to(device), cont_mask.to(device), labels.to(device)
        start = mask.sum(-1)[at[more]][:, None]
        logits = model(input_ids=cont, attention_mask=torch.cat([mask[at[more]], cont_mask], 1),
                       position_ids=start + torch.arange(cont.shape[1], device=device), use_cache=True,
                       **cache_kwargs(model, cache)).logits
        lp2, ok2, _ = _scores(logits, labels)
        lp[more] += lp2
        ok[more] += ok2
    idx = torch.tensor(pairs)
    lp_sum[idx] = lp.double().cpu()
    n_ok[idx] = ok.double().cpu()


def score_requests(logits_fn: LogitsFn, tok: PreTrainedTokenizerBase, requests: list[EditRequest],
                   batch_size: int = 64, device: torch.device | str = "cpu") -> list[dict]:
    """Per-record scores: {group: {"new": [TargetScore...], "true": [...]}} plus `loc` (zsRE) accuracy."""
    prompts, targets, keys = [], [], []
    for r_i, req in enumerate(requests):
        for group, ps in group_prompts(req).items():
            for p_i, p in enumerate(ps):
                for kind, tgt in (("new", req.target_new), ("true", req.target_true)):
                    prompts.append(p), targets.append(tgt), keys.append((r_i, group, kind, p_i))
        if req.loc and req.loc_ans:
            prompts.append(req.loc), targets.append(req.loc_ans), keys.append((r_i, "loc", "ans", 0))
    scores = score_pairs(logits_fn, tok, prompts, targets, batch_size, device) if prompts else []
    records: list[dict] = [{"case_id": req.case_id} for req in requests]
    for (r_i, group, kind, _), sc in zip(keys, scores):
        records[r_i].setdefault(group, {}).setdefault(kind, []).append({"nll": sc.nll, "acc": sc.acc})
    return records
