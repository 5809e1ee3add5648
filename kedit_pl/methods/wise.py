"""WISE: a side memory beside one MLP output projection, with activation routing (Wang et al., NeurIPS 2024).

The main memory W_v (the `mlp_out` weight of one layer) never changes. Edits are written into a side copy W_v'
(kept as ΔW = W_v' − W_v, `wise_memory.py`), trained per batch of edits by SGD on
    L = NLL(target_new | rewrite; W_v')                                   (the edit loss)
      + [Δ_act(x_i) − α]₊ + [β − Δ_act(x_e)]₊ + [γ − (Δ_act(x_e) − Δ_act(x_i))]₊   (the routing margin loss)
with Δ_act(x) = ‖A(x)·(W_v' − W_v)‖₂ the activation score (A(x): the projection's input, averaged over the
prompt's tokens), x_e the edit prompts and x_i irrelevant text (`irrelevant_texts`). The gradient is masked by
the current shard's random mask (a fraction ρ = `mask_ratio` of entries; knowledge sharding) and ΔW is clamped
entrywise to ±`norm_constraint`. Every `save_freq` edits the shard closes and a new one (new mask) starts;
every `merge_freq` edits the closed shards are TIES-merged (knowledge merging):
- `variant: merge` (WISE-Merge): into the one side memory (with the earlier merged memory as one more task vector);
- `variant: retrieve` (WISE-Retrieve): into a new side memory kept beside the earlier ones.

Routing (each input, by its prompt): every side memory j scores Δ_act^j(x); memories whose score exceeds their
threshold ε_j = act_ratio × (smallest Δ_act of the edits written into j) compete, the highest wins and replaces the
projection's output for that input; if none exceeds its threshold the input sees the main memory: the layer's
output is left untouched, so such inputs get the unedited model's logits bit for bit.

Evaluation, generation and plain forward passes of `method.model` all see the routed system: a forward hook on
the projection routes each row by its prompt (`logits_fn`) or, for a plain call, by all its tokens; cached
continuations keep their prompt's route. The hook is there only while a side memory holds edits (or a ΔW is being
trained): an emptied memory leaves the model without hooks, as it was. Restore puts back the memory state from before the edit (exactly).
"""
from __future__ import annotations

import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.eval.scoring import LogitsFn, RoutedLogits, forward_logits
from kedit_pl.hooks import StopForward, stop_after
from kedit_pl.methods.base import EditHandle, EditMethod, LastingRoute
from kedit_pl.methods.wise_memory import Memory, WiseState, activation_scores, random_mask, ties_merge
from kedit_pl.models.kv_cache import cache_arg
from kedit_pl.models.spec import linear_weight
from kedit_pl.tokens import encode_prompts, encode_targets, label_logprobs, pad_id, right_pad

log = logging.getLogger(__name__)

VARIANTS = ("merge", "retrieve")
DEFAULT_IRRELEVANT = (
    "The river flows through the valley before it reaches the sea.",
    "Photosynthesis turns light, water and carbon dioxide into sugar.",
    "She bought bread, milk and eggs at the market on Saturday.",
    "The committee will meet again next week to discuss the budget.",
)


@dataclass
class WiseHandle(EditHandle):
    """WISE's restore handle: the side-memory state from before the edit (the weights are never touched)."""

    state: WiseState = field(default_factory=WiseState)


class WISE(EditMethod):
    """Side memory + activation routing + knowledge sharding and merging around a frozen model."""

    sequential_resumable = False  # its sequential state (the memories) is saved to memory_path, not checkpointed

    def __init__(self, model=None, tokenizer=None, spec=None, *, name: str = "wise", layer: int = 0,
                 variant: str = "merge", edit_lr: float = 1.0, n_iter: int = 70, mask_ratio: float = 0.2,
                 norm_constraint: float | None = 1.0, act_margin: Sequence[float] = (5.0, 20.0, 10.0),
                 act_ratio: float = 0.88, save_freq: int = 500, merge_freq: int = 1000, density: float = 0.53,
                 early_stop_nll: float = 1e-2, irrelevant_texts: Sequence[str] = DEFAULT_IRRELEVANT,
                 seed: int = 0, memory_path: str | None = None, memory_load: str | None = None) -> None:
        super().__init__(model, tokenizer, spec)
        _check(variant=variant, edit_lr=edit_lr, n_iter=n_iter, mask_ratio=mask_ratio, act_margin=act_margin,
               act_ratio=act_ratio, save_freq=save_freq, merge_freq=merge_freq, density=density,
               irrelevant_texts=irrelevant_texts, norm_constraint=norm_constraint)
        self.variant, self.edit_lr, self.n_iter, self.mask_ratio = variant, float(edit_lr), int(n_iter), float(mask_ratio)
        self.norm_constraint = None if norm_constraint is None else float(norm_constraint)
        self.alpha, self.beta, self.gamma = (float(m) for m in act_margin)
        self.act_ratio, self.save_freq, self.merge_freq = float(act_ratio), int(save_freq), int(merge_freq)
        self.density, self.early_stop_nll, self.seed = float(density), float(early_stop_nll), int(seed)
        self.irrelevant = list(irrelevant_texts)
        self.layer, self.memory_path = int(layer), memory_path
        self.module_name = spec.module_name("mlp_out", self.layer)
        self.shape = tuple(linear_weight(model.get_submodule(self.module_name)).shape)  # (d_out, d_in)
        self.state = WiseState()
        # what the hook does on the next forward: train a ΔW, force routes, or route by a token mask
        self._train_delta: torch.Tensor | None = None
        self._forced: torch.Tensor | None = None
        self._valid: torch.Tensor | None = None
        self._last_route: torch.Tensor | None = None
        self._hook: Any = None  # the routing hook, on the projection while there is anything to route or train
        if memory_load:
            self.load_memory(memory_load)

    def _sync_hook(self) -> None:
        """Put the routing hook on the projection exactly while a side memory holds edits or a ΔW is trained:
        with an empty memory the model is the plain main memory, with no hook on it (as GRACE's codebook)."""
        need = self._train_delta is not None or not self.state.empty()  # a forced route needs a memory
        if need and self._hook is None:
            me = weakref.ref(self)  # the hook must not keep a dropped WISE (and its memories) alive

            def hook(module: nn.Module, args: tuple, out: Any) -> Any:
                wise = me()
                return out if wise is None else wise._route_hook(module, args, out)

            self._hook = self.model.get_submodule(self.module_name).register_forward_hook(hook)
        elif not need and self._hook is not None:
            self._hook.remove()
            self._hook = None

    def close(self) -> None:
        """Empty the side memory and remove the routing hook: the model is the plain main memory again."""
        self.state = WiseState()
        self._sync_hook()

    # --- the hook on the projection: main memory, side memory, or the ΔW being trained --------------------
    def _route_hook(self, _module: nn.Module, args: tuple, out: Any) -> Any:
        y = out[0] if isinstance(out, tuple) else out
        x = args[0]
        flat = x.dim() == 2
        x3 = x[None] if flat else x
        if self._train_delta is not None:
            new = y + (x3.float() @ self._train_delta.T).to(y.dtype).view(y.shape)
            return (new, *out[1:]) if isinstance(out, tuple) else new
        mems = self.state.candidates()
        if not mems:
            return out
        route = self._forced if self._forced is not None else self.route(x3.detach(), self._valid)
        self._last_route = route
        if not (route >= 0).any():
            return out  # every row on the main memory: the output is exactly the unedited layer's
        y3 = y[None] if flat else y
        new = y3.clone()
        for j in route.unique().tolist():
            if j >= 0:
                rows = (route == j).nonzero().flatten()
                new[rows] = y3[rows] + (x3[rows].float() @ mems[j].delta.to(x.device).T).to(y.dtype)
        new = new.view(y.shape)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    @torch.no_grad()
    def route(self, acts: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Per row: the index of the side memory that answers it (among `state.candidates()`), or −1 (main).
        A memory competes when Δ_act^j(x) > ε_j = act_ratio · min_act_j; the highest score wins."""
        mems = self.state.candidates()
        if valid is None:
            valid = torch.ones(acts.shape[:2], dtype=torch.bool, device=acts.device)
        best = torch.full((acts.shape[0],), -1, dtype=torch.long, device=acts.device)
        top = torch.full((acts.shape[0],), -float("inf"), device=acts.device)
        for j, m in enumerate(mems):
            s = activation_scores(acts, m.delta.to(acts.device), valid)
            win = (s > self.act_ratio * m.min_act) & (s > top)
            best[win], top[win] = j, s[win]
        return best

    @contextmanager
    def _mode(self, train_delta: torch.Tensor | None = None, forced: torch.Tensor | None = None,
              valid: torch.Tensor | None = None) -> Iterator[None]:
        self._train_delta, self._forced, self._valid = train_delta, forced, valid
        self._sync_hook()
        try:
            yield
        finally:
            self._train_delta = self._forced = self._valid = None
            self._sync_hook()

    # --- serving: logits, cached prefixes ----------------------------------------------------------------
    def logits_fn(self) -> LogitsFn:
        return RoutedLogits(self.routed_logits, self.prompt_prefixes)

    @torch.no_grad()
    def routed_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_lengths: list[int] | None = None, keep: int | None = None) -> torch.Tensor:
        """Logits with each row routed by its prompt (its first `prompt_lengths[b]` real tokens; all without)."""
        valid = attention_mask.bool()
        if prompt_lengths is not None:
            plen = torch.tensor(prompt_lengths, device=valid.device)[:, None]
            valid = valid & (attention_mask.cumsum(-1) <= plen)
        with self._mode(valid=valid):
            return forward_logits(self.model, input_ids, attention_mask, keep)

    @torch.no_grad()
    def prompt_routes(self, rows: list[list[int]]) -> list[int]:
        """The route of each prompt (token ids), from a forward pass that stops at the routed projection."""
        if self.state.empty():
            return [-1] * len(rows)
        ids, mask = _right_pad(rows, pad_id(self.tok), self.device)
        with self._mode(valid=mask.bool()), stop_after(self.model, self.module_name):
            try:
                self.model(input_ids=ids, attention_mask=mask)
            except StopForward:
                pass
        return self._last_route.tolist()

    def lasting_routes(self, rows: list[list[int]]) -> list[LastingRoute]:
        """Each prompt on the model, with the ΔW of the side memory its route picks added at every token (the route
        hook's own formula): valid after `restore` empties the memory."""
        mems, deltas = self.state.candidates(), {}
        out = []
        for row, j in zip(rows, self.prompt_routes(rows)):
            if j >= 0 and j not in deltas:
                deltas[j] = {self.module_name: {"delta": mems[j].delta.detach().clone().to(self.device)}}
            out.append(LastingRoute(self.model, list(row), weights=deltas.get(j)))
        return out

    def prompt_prefixes(self, rows: list[list[int]]) -> list[tuple[nn.Module, list[int]]]:
        """Each prompt continued from its own ids by the model with the prompt's route held for every token."""
        routes = self.prompt_routes(rows)
        models = {j: RoutedModel(self, j) for j in set(routes)}
        return [(models[j], row) for j, row in zip(routes, rows)]

    # --- editing -----------------------------------------------------------------------------------------
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return []  # the main memory never changes

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        raise NotImplementedError("WISE writes its side memory; see WISE.apply")

    def apply(self, requests: list[EditRequest]) -> WiseHandle:
        """Write the batch into the current shard (then close / merge shards at their boundaries). On any failure
        the memory state is put back before the error propagates."""
        before = self.state.copy()
        start = time.perf_counter()
        try:
            with self.editing(rollback=lambda: setattr(self, "state", before)), torch.enable_grad():
                info = self._write(requests)
        finally:
            self._sync_hook()
        return WiseHandle(info=info, seconds=time.perf_counter() - start, n_requests=len(requests), state=before)

    def restore(self, handle: EditHandle) -> None:
        if not isinstance(handle, WiseHandle):
            raise TypeError(f"WISE restores a WiseHandle, got {type(handle).__name__}")
        self.state = handle.state.copy()
        self._sync_hook()

    def _prompt_acts(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A(x): the projection's input for every token (it does not depend on ΔW), without grad."""
        got: list[torch.Tensor] = []
        h = self.model.get_submodule(self.module_name).register_forward_hook(
            lambda _m, a, _o: got.append(a[0].detach()))
        try:
            with torch.no_grad(), self._mode(forced=torch.full((ids.shape[0],), -1, device=ids.device)), \
                    stop_after(self.model, self.module_name):
                try:
                    self.model(input_ids=ids, attention_mask=mask)
                except StopForward:
                    pass
        finally:
            h.remove()
        a = got[0]
        return a[None] if a.dim() == 2 else a

    def _write(self, requests: list[EditRequest]) -> dict[str, Any]:
        st = self.state
        if st.current is None:  # a new shard: zero ΔW and its own random mask
            gen = torch.Generator().manual_seed(self.seed + st.n_edits)
            st.current = Memory(torch.zeros(self.shape))
            st.mask = random_mask(self.shape, self.mask_ratio, gen)
        dev = self.device
        batch = encode_targets(self.tok, [r.rewrite for r in requests], [r.target_new for r in requests]).to(dev)
        e_valid = batch.attention_mask.bool() & (batch.attention_mask.cumsum(-1)
                                                 <= torch.tensor(batch.prompt_lengths, device=dev)[:, None])
        ids_i, mask_i, _ = encode_prompts(self.tok, self.irrelevant)
        ids_i, mask_i = ids_i.to(dev), mask_i.to(dev)
        a_e, a_i = self._prompt_acts(batch.input_ids, batch.attention_mask), self._prompt_acts(ids_i, mask_i)
        delta = st.current.delta.to(dev).clone().requires_grad_(True)
        mask = st.mask.to(dev)
        opt = torch.optim.SGD([delta], lr=self.edit_lr)
        n_tok = batch.target_mask.sum(-1)
        for step in range(self.n_iter):
            with self._mode(train_delta=delta):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            nll = (-label_logprobs(logits, batch.labels).sum(-1) / n_tok).mean()
            s_e = activation_scores(a_e, delta, e_valid)
            s_i = activation_scores(a_i, delta, mask_i.bool())
            margin = ((s_i - self.alpha).clamp_min(0).mean() + (self.beta - s_e).clamp_min(0).mean()
                      + (self.gamma - (s_e[:, None] - s_i[None, :])).clamp_min(0).mean())
            if nll.item() < self.early_stop_nll and margin.item() == 0:
                break
            opt.zero_grad()
            (nll + margin).backward()
            delta.grad.mul_(mask)  # knowledge sharding: only this shard's entries learn
            opt.step()
            if self.norm_constraint is not None:
                with torch.no_grad():
                    delta.clamp_(-self.norm_constraint, self.norm_constraint)
        delta = delta.detach()
        if not torch.isfinite(delta).all():
            raise EditFailed("WISE: the side memory became non-finite; edit rejected")
        s_e = activation_scores(a_e, delta, e_valid)
        s_i = activation_scores(a_i, delta, mask_i.bool())
        st.current = Memory(delta.cpu(), min(st.current.min_act, float(s_e.min())), st.current.n_edits + len(requests))
        st.n_edits += len(requests)
        merged = self._boundaries()
        return {"edit_nll": float(nll.detach()), "iterations": step + 1, "act_edit_min": float(s_e.min()),
                "act_irrelevant_max": float(s_i.max()), "side_memories": len(st.memories),
                "shards": len(st.shards) + (st.current is not None), "merged": merged}

    def _boundaries(self) -> bool:
        """Close the shard after `save_freq` edits; TIES-merge the closed shards every `merge_freq` edits."""
        st = self.state
        if st.current is not None and st.current.n_edits >= self.save_freq:
            st.shards.append(st.current)
            st.current, st.mask = None, None
        if len(st.shards) < self.merge_freq // self.save_freq:
            return False
        parts = list(st.shards)
        if self.variant == "merge" and st.memories:
            parts = [st.memories[0], *parts]
        merged = Memory(ties_merge([p.delta for p in parts], self.density), min(p.min_act for p in parts),
                        sum(p.n_edits for p in parts))
        st.memories = [merged] if self.variant == "merge" else [*st.memories, merged]
        st.shards = []
        return True

    # --- the saved side memory ---------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"method": "wise", "model": getattr(self.spec, "name", None), "module": self.module_name,
                "shape": list(self.shape), "variant": self.variant}

    def save_memory(self, path: str | Path | None = None) -> Path:
        """Write the side memories (safetensors, with thresholds and counts as metadata)."""
        path = path or self.memory_path
        if not path:
            raise ConfigError("method.memory_path: no path to save the WISE side memory to")
        return self.state.save(path, self._info())

    def load_memory(self, path: str | Path) -> None:
        """Replace the side memory with a saved one (checked against this model, layer and variant)."""
        if not Path(path).is_file():
            raise ConfigError(f"method.memory_load: {path} does not exist")
        state, meta = WiseState.load(path)
        for key, want in self._info().items():
            if meta.get(key) != want:
                raise ConfigError(f"method.memory_load: {path} has {key}={meta.get(key)!r}, but this run has {want!r}")
        self.state = state
        self._sync_hook()

    def on_test_end(self) -> None:
        if self.memory_path and not self.state.empty():
            self.save_memory()


class RoutedModel(nn.Module):
    """The model with one route (−1: main memory, j: side memory j) held for every row and token of each call:
    what a cached continuation of a routed prompt runs on."""

    def __init__(self, wise: WISE, route: int) -> None:
        super().__init__()
        self.model, self._wise, self.route, self.config = wise.model, [wise], route, wise.model.config
        self._cache = cache_arg(wise.model)

    def get_output_embeddings(self) -> nn.Module:
        """The wrapped model's output embeddings (generation asks for them)."""
        return self.model.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, cache: Any = None, **kwargs: Any) -> Any:
        if cache is not None:
            kwargs[self._cache] = cache
        forced = torch.full((input_ids.shape[0],), self.route, device=input_ids.device)
        with self._wise[0]._mode(forced=forced):
            return self.model(input_ids=input_ids, **kwargs)


def _right_pad(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = right_pad(rows, pad)
    return ids.to(device), mask.to(device)


def _check(*, variant: str, edit_lr: float, n_iter: int, mask_ratio: float, act_margin: Sequence[float],
           act_ratio: float, save_freq: int, merge_freq: int, density: float, irrelevant_texts: Sequence[str],
           norm_constraint: float | None) -> None:
    """One-line errors for a bad WISE config, naming the field and its value."""
    if variant not in VARIANTS:
        raise ConfigError(f"method.variant: {variant!r} is not one of {', '.join(VARIANTS)}")
    if not edit_lr > 0 or int(n_iter) < 1:
        raise ConfigError(f"method.edit_lr/n_iter: need edit_lr > 0 and n_iter >= 1; got {edit_lr}, {n_iter}")
    if not 0 < mask_ratio <= 1:
        raise ConfigError(f"method.mask_ratio: the shard mask density ρ must be in (0, 1], got {mask_ratio}")
    if len(act_margin) != 3 or min(act_margin) < 0:
        raise ConfigError(f"method.act_margin: need three margins [α, β, γ] >= 0, got {list(act_margin)}")
    if not 0 < act_ratio <= 1:
        raise ConfigError(f"method.act_ratio: must be in (0, 1], got {act_ratio}")
    if int(save_freq) < 1 or int(merge_freq) < int(save_freq) or int(merge_freq) % int(save_freq):
        raise ConfigError(f"method.save_freq/merge_freq: need merge_freq a multiple of save_freq >= 1; got "
                          f"save_freq={save_freq}, merge_freq={merge_freq}")
    if not 0 < density <= 1:
        raise ConfigError(f"method.density: TIES keeps a fraction in (0, 1], got {density}")
    if not irrelevant_texts or not all(isinstance(t, str) and t.strip() for t in irrelevant_texts):
        raise ConfigError(f"method.irrelevant_texts: need a non-empty list of texts, got {list(irrelevant_texts)!r}")
    if norm_constraint is not None and not norm_constraint > 0:
        raise ConfigError(f"method.norm_constraint: must be > 0 or null, got {norm_constraint}")
