"""GRACE: General Retrieval Adaptors for Continual Editing (Hartvigsen et al., NeurIPS 2023).

A discrete key-value codebook sits at one layer's MLP output projection (`spec.mlp_out` at `layer`); the model's
weights never change. For an input, the query h is the projection's input at the prompt's last token (§3.1). With
the nearest key k_j at d = ‖h − k_j‖₂, the adaptor's output there is

    GRACE(h) = v_j  if d ≤ ε_j,   else the projection's own output (eq. 1),

so an input outside every deferral radius passes through untouched (the hook returns the original tensor).

An edit (x, y) adds to the codebook as the paper's Algorithm 1 says, with h the query of x:
- no key within ε_init + ε_j of h (or an empty codebook): add (h, v, ε_init, y);
- the nearest key has the same label y: expand its radius, ε_j ← d (if d > ε_j); no new key;
- it has another label: split: add (h, v, d/2, y) and shrink ε_j ← d/2, so the two radii do not overlap.
A new value v starts at the projection's output for x and is trained by `n_iter` Adam steps (lr `lr`) on the
NLL of y after x, with v in place at the query position (§3.2).

Scoring passes each row's prompt length, so a prompt + target row is looked up at the prompt's last token; with
no lengths (text, generation) the row's last real token is the query position, and forwards that continue from a
key/value cache pass through (their prompt already met the codebook). Labels are the target's token ids (stored
+1, zero-padded).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.eval.scoring import LogitsFn, RoutedLogits, forward_logits, model_logits
from kedit_pl.hooks import capture, observer
from kedit_pl.methods.base import LastingRoute, MemoryEditMethod
from kedit_pl.models.kv_cache import cache_arg
from kedit_pl.models.spec import ModelSpec, linear_weight
from kedit_pl.tokens import encode_targets, label_logprobs, prompt_ids, target_ids

KEYS = ("keys", "values", "eps", "labels")


class Grace(MemoryEditMethod):
    """A GRACE codebook adaptor at the MLP output projection of `layer` (Hydra: conf/method/grace.yaml)."""

    def __init__(self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 spec: ModelSpec | None = None, *, name: str = "grace", layer: int | None = None,
                 eps_init: float = 1.0, n_iter: int = 100, lr: float = 1.0, stop_loss: float = 0.0,
                 value_init: str = "warm") -> None:
        super().__init__(model, tokenizer, spec)
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise ConfigError(f"method.layer: must be an integer layer index, got {layer!r}")
        self.module_name = spec.module_name("mlp_out", layer)  # ConfigError if out of range
        if not eps_init > 0:
            raise ConfigError(f"method.eps_init: the initial deferral radius must be > 0, got {eps_init}")
        if int(n_iter) < 1 or not lr > 0 or stop_loss < 0:
            raise ConfigError(f"method.n_iter/lr/stop_loss: need n_iter >= 1, lr > 0, stop_loss >= 0; got "
                              f"{n_iter}, {lr}, {stop_loss}")
        if value_init not in ("warm", "cold"):
            raise ConfigError(f"method.value_init: {value_init!r} is not one of warm, cold")
        self.layer, self.eps_init, self.n_iter, self.lr = layer, float(eps_init), int(n_iter), float(lr)
        self.stop_loss, self.value_init = float(stop_loss), value_init
        weight = linear_weight(spec.module(model, "mlp_out", layer))  # (out, in) orientation
        dev = weight.device
        self.keys = torch.zeros(0, weight.shape[1], device=dev)
        self.values = torch.zeros(0, weight.shape[0], device=dev)
        self.eps = torch.zeros(0, device=dev)
        self.labels = torch.zeros(0, 0, dtype=torch.long, device=dev)
        self._hooks: list[Any] = []
        self._positions: list[int] | None = None  # query position per row for the next forward (scoring)
        self._continuation = False  # the current forward continues from a key/value cache
        self._mask: torch.Tensor | None = None
        self._train: tuple[int, torch.Tensor] | None = None  # (position, trainable value) while a value trains

    # --- the codebook as tensors (MemoryEditMethod) ------------------------------------------------------
    def memory_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k).detach().clone() for k in KEYS}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(KEYS):
            raise ConfigError(f"GRACE memory: expected tensors {list(KEYS)}, got {sorted(state)}")
        n = state["keys"].shape[0]
        if any(state[k].shape[0] != n for k in KEYS) or state["keys"].shape[1:] != self.keys.shape[1:] \
                or state["values"].shape[1:] != self.values.shape[1:]:
            raise ConfigError(f"GRACE memory: shapes {[tuple(state[k].shape) for k in KEYS]} do not fit layer "
                              f"{self.layer} of this model (keys {tuple(self.keys.shape[1:])}, values "
                              f"{tuple(self.values.shape[1:])})")
        dev = next(self.model.parameters()).device
        for k in KEYS:
            setattr(self, k, state[k].detach().clone().to(dev))
        self._sync_hooks()

    @property
    def memory_size(self) -> int:
        """Entries in the codebook (not `__len__`: Lightning tests a module's truth)."""
        return int(self.keys.shape[0])

    # --- the adaptor: forward hooks, present only while the codebook holds entries -------------------------
    def _sync_hooks(self) -> None:
        if self.memory_size and not self._hooks:
            arg = cache_arg(self.model)
            self._hooks = [self.model.register_forward_pre_hook(self._watch(arg), with_kwargs=True),
                           self.model.get_submodule(self.module_name).register_forward_hook(self._adaptor)]
        elif not self.memory_size and self._hooks and self._train is None:
            for h in self._hooks:
                h.remove()
            self._hooks = []

    def _watch(self, arg: str):
        @observer  # reads the call's cache and mask, changes nothing
        def pre(_mod, args, kwargs):
            cache = kwargs.get(arg)
            self._continuation = cache is not None and cache.get_seq_length() > 0
            self._mask = kwargs.get("attention_mask")
        return pre

    def _query_positions(self, h: torch.Tensor) -> torch.Tensor:
        """Per row: the prompt's last token (scoring), else the last real token of the row."""
        B, T = h.shape[:2]
        if self._positions is not None:
            return torch.tensor(self._positions, device=h.device)
        if self._mask is not None and self._mask.dim() == 2 and tuple(self._mask.shape) == (B, T):
            return (T - 1) - self._mask.flip(-1).to(torch.long).argmax(-1)
        return torch.full((B,), T - 1, device=h.device)

    def _adaptor(self, _mod, args, out):
        h = args[0]
        if self._train is not None:  # training a value: it stands at the edit's query position
            pos, value = self._train
            out = out.clone()
            out[:, pos] = value.to(out.dtype)
            return out
        if self._continuation or h.dim() != 3:
            return None
        pos = self._query_positions(h)
        rows = torch.arange(h.shape[0], device=h.device)
        dist, nearest = torch.cdist(h[rows, pos].float(), self.keys.to(h.device, torch.float32)).min(-1)
        hit = dist <= self.eps.to(h.device)[nearest]
        if not bool(hit.any()):
            return None  # outside every radius: the projection's own output, the same tensor
        out = out.clone()
        r = hit.nonzero().flatten()
        out[r, pos[r]] = self.values.to(h.device)[nearest[r]].to(out.dtype)
        return out

    @contextmanager
    def _at(self, prompt_lengths: list[int] | None) -> Iterator[None]:
        self._positions = [int(n) - 1 for n in prompt_lengths] if prompt_lengths is not None else None
        try:
            yield
        finally:
            self._positions = None

    # --- serving -----------------------------------------------------------------------------------------
    def logits_fn(self) -> LogitsFn:
        """The model with the adaptor, looked up at each row's prompt end; prompts are continued by the model itself
        (the prompt-cache path), so scoring, generation and every metric group see the codebook."""
        if not self.memory_size:
            return model_logits(self.model)
        return RoutedLogits(self._logits, lambda rows: [(self.model, r) for r in rows])

    @torch.no_grad()
    def lasting_routes(self, rows: list[list[int]]) -> list[LastingRoute] | None:
        """The model and the prompt, with the codebook's value for the prompt's last token when its key falls within
        a radius (what the adaptor would write there): all of GRACE's effect, so it outlives `restore`."""
        routes = []
        for row in rows:
            hit = None
            if self.memory_size:
                h, _ = self._query(list(row))
                d, j = (x[0] for x in torch.cdist(h[None].to(self.keys.device), self.keys.float()).min(-1))
                if d <= self.eps[j]:  # as the adaptor decides
                    hit = (self.module_name, self.values[j].detach().clone())
            routes.append(LastingRoute(self.model, list(row), hit))
        return routes

    @torch.no_grad()
    def _logits(self, ids: torch.Tensor, mask: torch.Tensor, prompt_lengths: list[int] | None = None,
                keep: int | None = None) -> torch.Tensor:
        with self._at(prompt_lengths):
            return forward_logits(self.model, ids, mask, keep)

    # --- editing (Algorithm 1) -----------------------------------------------------------------------------
    def remember(self, requests: list[EditRequest]) -> dict[str, Any]:
        dev = next(self.model.parameters()).device  # the codebook follows the model (Lightning may have moved it)
        for k in KEYS:
            setattr(self, k, getattr(self, k).to(dev))
        actions, losses = [], []
        for req in requests:
            action, loss = self._edit_one(req)
            actions.append(action)
            losses.append(loss)
        return {"codebook_size": self.memory_size, "actions": actions, "value_loss": losses}

    def _edit_one(self, req: EditRequest) -> tuple[str, float | None]:
        p_ids = prompt_ids(self.tok, req.rewrite)
        label = torch.tensor(target_ids(self.tok, req.target_new), device=self.keys.device)
        h, v0 = self._query(p_ids)
        if not self.memory_size:
            return "add", self._add(h, v0, self.eps_init, label, req)
        dist = torch.linalg.vector_norm(self.keys.float() - h.float(), dim=-1)
        d, j = (x.item() for x in dist.min(0))
        if d > self.eps_init + float(self.eps[j]):
            return "add", self._add(h, v0, self.eps_init, label, req)
        if self._same_label(j, label):
            if d > float(self.eps[j]):
                self.eps[j] = d  # expand: the nearest key's radius now covers h
            return "expand", None
        self.eps[j] = d / 2  # split: both radii halve the distance, so they do not overlap
        return "split", self._add(h, v0, d / 2, label, req)

    def _same_label(self, j: int, label: torch.Tensor) -> bool:
        row = self.labels[j]
        stored = row[row > 0] - 1
        return stored.shape == label.shape and bool((stored == label).all())

    @torch.no_grad()
    def _query(self, p_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The query h (the projection's input) and its own output at the prompt's last token, codebook off."""
        ids = torch.tensor([p_ids], device=self.keys.device)
        hooks, self._hooks = self._hooks, []
        for hk in hooks:
            hk.remove()
        try:
            with capture(self.model, [self.module_name], inputs=True, outputs=True) as cap:
                self.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        finally:
            self._sync_hooks()
        return cap.inputs[self.module_name][0, -1].float(), cap.outputs[self.module_name][0, -1].float()

    def _add(self, h: torch.Tensor, v0: torch.Tensor, eps: float, label: torch.Tensor, req: EditRequest) -> float:
        value, loss = self._train_value(v0, req)
        width = max(self.labels.shape[1], label.shape[0])
        labels = torch.zeros(self.memory_size + 1, width, dtype=torch.long, device=self.labels.device)
        labels[:self.memory_size, :self.labels.shape[1]] = self.labels
        labels[-1, :label.shape[0]] = label + 1  # ids + 1, 0 = padding
        self.keys = torch.cat([self.keys, h[None].to(self.keys)])
        self.values = torch.cat([self.values, value[None].to(self.values)])
        self.eps = torch.cat([self.eps, torch.tensor([eps], device=self.eps.device)])
        self.labels = labels
        self._sync_hooks()
        return loss

    def _train_value(self, v0: torch.Tensor, req: EditRequest) -> tuple[torch.Tensor, float]:
        """v minimizing the NLL of target_new after the rewrite prompt, v in place at the prompt's last token."""
        batch = encode_targets(self.tok, [req.rewrite], [req.target_new]).to(self.keys.device)
        pos = batch.prompt_lengths[0] - 1
        if self.value_init == "cold":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                v0 = torch.rand(v0.shape).to(v0)
        value = v0.detach().clone().requires_grad_(True)
        opt = torch.optim.Adam([value], lr=self.lr)
        hooks, self._hooks = self._hooks, []  # the codebook's own lookup is off while the value trains
        for hk in hooks:
            hk.remove()
        self._train = (pos, value)
        handle = self.model.get_submodule(self.module_name).register_forward_hook(self._adaptor)
        mask = batch.labels != -100
        try:
            with torch.enable_grad():
                for _ in range(self.n_iter):
                    logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                    loss = -label_logprobs(logits.float(), batch.labels)[mask].mean()
                    if loss.item() <= self.stop_loss:
                        break
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
        finally:
            handle.remove()
            self._train = None
            self._sync_hooks()
        if not torch.isfinite(value).all():
            raise EditFailed(f"GRACE: the value for record case_id={req.case_id} became non-finite; edit rejected")
        return value.detach().float(), float(loss.item())
