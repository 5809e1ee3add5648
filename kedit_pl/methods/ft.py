"""Constrained fine-tuning editors: FT and FT-L (Zhu et al. 2020, "Modifying Memories in Transformer Models").

Both minimise the NLL of target_new after the rewrite prompt over the weights of chosen modules:
    min_θ  -log P_θ(target_new | prompt)
FT-L adds Zhu et al.'s constraint ||θ - θ₀||_∞ ≤ δ, enforced by projecting onto the L∞ ball after
every optimiser step (their eq. 3, projected gradient descent), as in the ROME paper's FT+L baseline.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.methods.base import EditMethod
from kedit_pl.tokens import encode_targets, label_logprobs

#: weight dtypes the optimizer updates directly (others get a float32 master copy)
FULL = (torch.float32, torch.float64)


class FineTune(EditMethod):
    """FT when `norm_constraint` is None, FT-L when it is a positive L∞ bound δ."""

    def __init__(self, model=None, tokenizer=None, spec=None, *, layers: Sequence[int] = (0,),
                 modules: Sequence[str] = ("mlp_out",), lr: float = 5e-4, steps: int = 25,
                 norm_constraint: float | None = None, weight_decay: float = 0.0,
                 early_stop_loss: float = 1e-2, name: str = "ft") -> None:
        super().__init__(model, tokenizer, spec)
        if norm_constraint is not None and norm_constraint <= 0:
            raise ConfigError(f"method.norm_constraint: must be > 0 or null, got {norm_constraint}")
        if steps < 1 or lr <= 0:
            raise ConfigError(f"method.steps/lr: need steps >= 1 and lr > 0, got steps={steps}, lr={lr}")
        self.layers, self.targets = list(layers), list(modules)
        self.lr, self.steps, self.norm_constraint = lr, steps, norm_constraint
        self.weight_decay, self.early_stop_loss = weight_decay, early_stop_loss

    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return [self.spec.weight_name(m, layer) for layer in self.layers for m in self.targets]

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        named = dict(self.model.named_parameters())
        params = [named[n] for n in self.edited_parameters(requests)]
        # the optimizer updates float32 master copies of half-precision weights (mixed precision: Adam's state and
        # small steps survive), written back in the weights' dtype after every step; float32 weights are their own
        masters = [p if p.dtype in FULL else p.detach().float().requires_grad_(True) for p in params]
        start = [m.detach().clone() for m in masters] if self.norm_constraint else []
        batch = encode_targets(self.tok, [r.rewrite for r in requests], [r.target_new for r in requests]).to(self.device)
        n_tok = batch.target_mask.sum(-1)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(masters, lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        try:
            for _ in range(self.steps):
                logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                loss = (-(label_logprobs(logits, batch.labels).sum(-1) / n_tok)).mean()
                if not torch.isfinite(loss):
                    raise EditFailed(f"{type(self).__name__}: loss became {loss.item()} at step {len(losses)}")
                losses.append(loss.item())
                if loss.item() < self.early_stop_loss:
                    break
                opt.zero_grad()
                loss.backward()
                for p, m in zip(params, masters):
                    if m is not p:
                        m.grad, p.grad = p.grad.float(), None
                opt.step()
                with torch.no_grad():
                    if self.norm_constraint:  # projection onto {θ : ||θ − θ₀||∞ ≤ δ}
                        for m, m0 in zip(masters, start):
                            m.copy_(torch.clamp(m, m0 - self.norm_constraint, m0 + self.norm_constraint))
                    for p, m in zip(params, masters):
                        if m is not p:
                            p.copy_(m)  # rounded to the weight's dtype
        finally:
            for p in params:
                p.requires_grad_(False)
                p.grad = None
        return {"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}
