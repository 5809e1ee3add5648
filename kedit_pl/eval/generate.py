"""Batched greedy generation with the model's key/value cache (fluency, samples).

Prompts are left-padded so every row's next token sits in the last column; position ids follow each row's real
tokens. Every row generates exactly `max_new_tokens` tokens (no stop at EOS), as ROME's fluency evaluation does.
Generations always come from the edited system, never from a bypassed base model: each prompt is continued by
the model and ids that the method's `logits_fn.prefixes` routes it to (a weight editor: its own model and the
prompt; SERAC: by the prompt, as its paper routes an input, the base model or the counterfactual model reading
`[edit] [prompt]`), with that model's cache. A `logits_fn` without `prefixes` is generated through itself, one
full forward per token.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.eval.row_states import EditedSystem
from kedit_pl.eval.scoring import MIN_SHARED_PREFIX, model_logits, prefill, shared_prefix_length
from kedit_pl.hooks import first_pass_outputs, row_weights
from kedit_pl.models.kv_cache import cache_kwargs, output_cache, reserve
from kedit_pl.tokens import pad_id, prompt_ids, right_pad
from kedit_pl.weights import EditMethodProtocol, LastingRoute


@torch.no_grad()
def _greedy_cached(model: nn.Module, rows: list[list[int]], pad: int, max_new_tokens: int) -> list[list[int]]:
    device = next(model.parameters()).device
    out, mask = prefill(model, rows, pad, device)
    cache = reserve(output_cache(out), max_new_tokens)  # written in place, not concatenated at every step
    pos = mask.sum(-1, keepdim=True) - 1
    new = [out.logits[:, -1].argmax(-1)]
    for _ in range(max_new_tokens - 1):
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=new[-1][:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                    **cache_kwargs(model, cache))
        new.append(out.logits[:, -1].argmax(-1))
    return torch.stack(new, dim=1).tolist()


@torch.no_grad()
def _greedy_routed(logits_fn, rows: list[list[int]], pad: int, max_new_tokens: int, device) -> list[list[int]]:
    plens = [len(r) for r in rows]
    seqs = [list(r) for r in rows]
    for _ in range(max_new_tokens):
        ids, mask = (t.to(device) for t in right_pad(seqs, pad))
        logits = logits_fn(ids, mask, plens, None)
        for b, s in enumerate(seqs):
            s.append(int(logits[b, len(s) - 1].argmax()))
    return [s[n:] for s, n in zip(seqs, plens)]


def _generate_rows(fn, rows: list[list[int]], pad: int, max_new_tokens: int, device) -> list[list[int]]:
    """New token ids per row: routed by prompt to (model, ids) and generated with the cache, grouped by model."""
    prefixes = getattr(fn, "prefixes", None)
    if prefixes is None:
        return _greedy_routed(fn, rows, pad, max_new_tokens, device)
    routes = prefixes(rows)
    new: list[list[int] | None] = [None] * len(rows)
    for model in {id(m): m for m, _ in routes}.values():
        picked = [b for b, (m, _) in enumerate(routes) if m is model]
        for b, ids in zip(picked, _greedy_cached(model, [routes[b][1] for b in picked], pad, max_new_tokens)):
            new[b] = ids
    return new


def greedy_generate(method: EditMethodProtocol, prompts: list[str], max_new_tokens: int = 100, batch_size: int = 16,
                    stop_at_eos: bool = False) -> list[str]:
    """The continuation (decoded, special tokens dropped) of each prompt under the method's current model.

    Weight editors generate from `method.model` with its KV cache; a method whose `logits_fn` is its own
    (routing) generates through it. Identical prompts are generated once. `stop_at_eos` cuts each continuation
    at its first EOS (what a reader expects); fluency keeps all `max_new_tokens`, as ROME's evaluation does."""
    tok: PreTrainedTokenizerBase = method.tok
    fn = method.logits_fn() if method.serves_own_logits() else model_logits(method.model)
    unique = list(dict.fromkeys(prompts))
    texts: dict[str, str] = {}
    for s in range(0, len(unique), int(batch_size)):
        chunk = unique[s:s + int(batch_size)]
        rows = [prompt_ids(tok, p) for p in chunk]
        new = _generate_rows(fn, rows, pad_id(tok), max_new_tokens, method.device)
        for p, ids in zip(chunk, new):
            if stop_at_eos and tok.eos_token_id in ids:
                ids = ids[:ids.index(tok.eos_token_id)]
            texts[p] = tok.decode(ids, skip_special_tokens=True)
    return [texts[p] for p in prompts]


def greedy_generate_states(method: EditMethodProtocol, prompts: Sequence[Sequence[str]],
                           systems: Sequence[EditedSystem], max_new_tokens: int = 100,
                           batch_rows: int = 160) -> list[list[str]]:
    """`greedy_generate` of `prompts[i]` on edited system `systems[i]` (`row_states.capture`), for many systems at
    once, with every edit undone: the rows of all systems that route to the same model share batches of up to
    `batch_rows` rows, each system's rows through the weights its edit wrote. Identical prompts of one system are
    generated once."""
    tok: PreTrainedTokenizerBase = method.tok
    jobs: dict[int, list[tuple[int, str, LastingRoute]]] = {}  # model -> [(system, prompt, route)], system order
    models: dict[int, nn.Module] = {}
    for k, (ps, system) in enumerate(zip(prompts, systems)):
        for p in dict.fromkeys(ps):
            route = system.routes[p]
            models[id(route.model)] = route.model
            jobs.setdefault(id(route.model), []).append((k, p, route))
    texts: list[dict[str, str]] = [{} for _ in prompts]
    for key, rows in jobs.items():
        model = models[key]
        for chunk in _chunks(rows, int(batch_rows), max_new_tokens):
            blocks, start = [], 0
            run_of = lambda row: (row[0], id(row[2].weights))  # noqa: E731  (system, the route's own weights)
            for i in range(1, len(chunk) + 1):  # runs of rows through the same weights
                if i == len(chunk) or run_of(chunk[i]) != run_of(chunk[start]):
                    system, route = systems[chunk[start][0]], chunk[start][2]
                    weights = {**(system.weights if model is method.model else {}), **(route.weights or {})}
                    if weights:
                        blocks.append((start, i, weights))
                    start = i
            ends: dict[str, list] = {}  # GRACE: a module's output at a prompt's last token
            for row, (*_, route) in enumerate(chunk):
                if route.prompt_end is not None:
                    ends.setdefault(route.prompt_end[0], []).append((row, route.prompt_end[1]))
            with row_weights(model, blocks), first_pass_outputs(model, ends):
                new = _greedy_cached(model, [route.ids for *_, route in chunk], pad_id(tok), max_new_tokens)
            for (k, p, _), ids in zip(chunk, new):
                texts[k][p] = tok.decode(ids, skip_special_tokens=True)
    return [[t[p] for p in ps] for t, ps in zip(texts, prompts)]


#: a batch of rows behind long shared prefixes (IKE's demonstrations) holds at most this many cached positions in
#: all (rows x (longest prompt + new tokens)): about 1.8 GB of keys and values on SmolLM2-135M
PREFIXED_BATCH_TOKENS = 40_000


def _chunks(rows: list[tuple[int, str, LastingRoute]], size: int,
            room: int = 0) -> list[list[tuple[int, str, LastingRoute]]]:
    """Batches of at most `size` rows, in order. The rows of a system that share a long prefix (IKE's
    demonstrations) stay together, so that `prefill` runs that prefix once; such systems share batches of
    their own, up to `PREFIXED_BATCH_TOKENS` cached positions (prompt + `room` new tokens per row)."""
    by_system: dict[int, list] = {}
    for row in rows:
        by_system.setdefault(row[0], []).append(row)
    prefixed: list[list] = []
    mixed: list = []
    for own in by_system.values():
        if len(own) > 1 and shared_prefix_length([route.ids for *_, route in own]) >= MIN_SHARED_PREFIX:
            prefixed += [own[s:s + size] for s in range(0, len(own), size)]
        else:
            mixed += own
    out = [mixed[s:s + size] for s in range(0, len(mixed), size)]
    batch: list = []
    for own in prefixed:
        longest = max(len(route.ids) for *_, route in batch + own) + room
        if batch and (len(batch) + len(own) > size or (len(batch) + len(own)) * longest > PREFIXED_BATCH_TOKENS):
            out.append(batch)
            batch = []
        batch = batch + own
    return out + ([batch] if batch else [])
