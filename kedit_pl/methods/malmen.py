"""MALMEN: Massive Language Model Editing Network (Tan et al., ICLR 2024, "Massive Editing for Large Language
Models via Meta Learning").

MEND's hypernetwork (`mend_net.py`: per-shape editor MLP g, per-layer scale/shift, running normalization) maps each
token's gradient factors (u_t, δ_t) of a projection W to (ũ_t, δ̃_t). Where MEND sums the per-token rank-1
updates, MALMEN turns each token into a (key, value difference) pair,
    key u_t (the projection's input),   value difference d_t = −η_ℓ (ũ_tᵀ u_t) δ̃_t,
and aggregates the pairs of *all* edits of a batch by the least-squares problem
    S* = argmin_S ‖U S − D‖² + λ_ℓ ‖S‖²   ⇒   S* = (UᵀU + λ_ℓ I)⁻¹ UᵀD,   ΔW = S*ᵀ = Dᵀ U (UᵀU + λ_ℓ I)⁻¹
(MALMEN's normal equation; U: keys (n, d_in), D: value differences (n, d_out), λ_ℓ = exp(log λ_ℓ) learned per
layer, η_ℓ the learned step size, MEND's α_ℓ). The shift of many edits is one ridge solution, not a sum, so
edits that share keys do not cancel or pile up.

Training (train.py method=malmen): as MEND (`mend.py`), L = c_edit · NLL(target_new | rephrase) + c_loc · KL on
locality prompts, but every batch is one edit of all its requests under their aggregated ΔW, as MALMEN trains;
the gradient flows through the closed form into g, η_ℓ and λ_ℓ. The gradient factors are collected `chunk_size`
requests at a time (MALMEN's cache of keys and value gradients), so one batch may hold thousands of edits.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.methods.learned import Factors, rephrase
from kedit_pl.methods.mend import MEND
from kedit_pl.methods.mend_net import EditorConfig, MendEditor, Rows


def least_squares_shift(keys: torch.Tensor, values: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """ΔW = Dᵀ U (UᵀU + λI)⁻¹ for keys U (n, d_in) and value differences D (n, d_out): the (d_out, d_in) shift whose
    ridge fit maps every key to its value difference (MALMEN's normal equation)."""
    u, d = keys.float(), values.float()
    gram = u.T @ u + lam * torch.eye(u.shape[1], device=u.device, dtype=u.dtype)
    return torch.linalg.solve(gram, u.T @ d).T


class MalmenEditor(MendEditor):
    """MEND's editor networks and step sizes η_ℓ (`alpha`), plus the per-layer ridge strengths log λ_ℓ (init 0: λ = 1,
    as the reference code)."""

    def __init__(self, cfg: EditorConfig) -> None:
        super().__init__(cfg)
        self.log_lambda = nn.Parameter(torch.zeros(len(cfg.params)))

    def shifts(self, rows: Rows) -> dict[str, torch.Tensor]:
        """One aggregated ΔW (d_out, d_in) per edited parameter from the token rows (u, δ) of all edits."""
        out = {}
        for idx, (name, _, _) in enumerate(self.cfg.params):
            u, delta = rows[name]
            keep = (u != 0).any(-1) & (delta != 0).any(-1)  # rows without gradient (padding) carry no edit
            u, delta = u[keep].float(), delta[keep].float()
            key, mode = self.route[name]
            u_t, d_t = self.nets[key](u, delta, mode)
            values = -self.alpha[idx] * (u * u_t).sum(-1, keepdim=True) * d_t   # d_t = −η (ũ_tᵀ u_t) δ̃_t
            out[name] = least_squares_shift(u, values, self.log_lambda[idx].exp())
        return out


class MALMEN(MEND):
    """A learned batch editor: `train.py method=malmen` trains it, `edit.py method=malmen method.checkpoint=PATH
    edit.mode=batch edit.batch_size=N` edits N records with one aggregated shift."""

    KIND = "malmen"
    STEP_SIZES = ("alpha", "log_lambda")

    def __init__(self, model=None, tokenizer=None, spec=None, *, chunk_size: int = 16, name: str = "malmen",
                 **kwargs: Any) -> None:
        if int(chunk_size) < 1:
            raise ConfigError(f"method.chunk_size: requests per gradient pass must be >= 1, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        kwargs.pop("train_together", None)  # MALMEN always edits a batch together
        super().__init__(model, tokenizer, spec, name=name, **kwargs)

    def build_editor(self, cfg: EditorConfig) -> MalmenEditor:
        return MalmenEditor(cfg)

    def gradient_factors(self, requests: list[EditRequest]) -> tuple[torch.Tensor, Factors, torch.Tensor]:
        """MEND's factors, `chunk_size` requests per backward pass; the token rows of all chunks (padding dropped)
        come back as one row of a (1, N, ·) batch with an all-true mask."""
        nll, us, ds = [], {}, {}
        for s in range(0, len(requests), self.chunk_size):
            n, factors, mask = super().gradient_factors(requests[s:s + self.chunk_size])
            nll.append(n)
            for p, (u, d) in factors.items():
                us.setdefault(p, []).append(u[mask])
                ds.setdefault(p, []).append(d[mask])
        rows = {p: (torch.cat(us[p])[None], torch.cat(ds[p])[None]) for p in us}
        n_rows = next(iter(rows.values()))[0].shape[1]
        return torch.cat(nll), rows, torch.ones(1, n_rows, dtype=torch.bool, device=self.device)

    def request_deltas(self, requests: list[EditRequest], factors: Factors, mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """The batch's one aggregated shift, as a (1, d_out, d_in) update (`compute_edit` adds it once)."""
        rows = {p: (u[mask], d[mask]) for p, (u, d) in factors.items()}
        return {n: d[None] for n, d in self.editor.shifts(rows).items()}

    def losses(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """L = c_edit·L_edit + c_loc·L_loc with every request under the batch's one aggregated shift."""
        nll_pre, factors, mask = self.gradient_factors(requests)
        shift = self.request_deltas(requests, factors, mask)
        shared = {n: d.expand(len(requests), -1, -1) for n, d in shift.items()}  # row i reads edit i: the same ΔW
        nll, acc = self.edited_nll([(0, rephrase(r), r.target_new) for r in requests], shift)
        out = {"edit_loss": nll.mean(), "edit_acc": acc, "rewrite_nll_pre": nll_pre.mean(),
               "loc_loss": self.locality_loss(requests, shared)}
        out["loss"] = self.c_edit * out["edit_loss"] + self.c_loc * out["loc_loss"]
        return out

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> torch.Tensor:
        self.log("train/lambda_mean", self.editor.log_lambda.detach().exp().mean(), batch_size=len(batch))
        return super().training_step(batch, batch_idx)
