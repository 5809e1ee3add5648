"""EMMET: Equality-constrained Mass Model Editing in a Transformer (Gupta et al., 2024).

MEMIT's machinery (z, keys, residual spread over the layers, methods/memit.py) with the batched
equality-constrained closed form instead of MEMIT's least squares. With C = α E[kkᵀ] (+ β I) the preserved-key
term (α = `mom2_update_weight`, β = `update_norm_lambda`, as the reference code scales it) and the keys K as
columns, the update of the paper's eq. 6 is

    ΔW = R (Kᵀ C⁻¹ K + λ I)⁻¹ Kᵀ C⁻¹,      λ = `emmet_lambda` (only for n > 1, as the reference code),

i.e. every edit's key is mapped exactly onto its target (λ = 0) while C-weighted change is minimal. For one
edit it is ROME's rank-one update r (C⁻¹k)ᵀ / (kᵀC⁻¹k) (with the same key in both places, as r-ROME).
"""
from __future__ import annotations

from typing import Any

import torch

from kedit_pl.errors import ConfigError
from kedit_pl.methods.memit import MEMIT
from kedit_pl.methods.rome import CovarianceSolver


def emmet_update(keys: torch.Tensor, resid: torch.Tensor, solver: CovarianceSolver | None,
                 emmet_lambda: float) -> torch.Tensor:
    """ΔW (d_out, d_k) in float64 from EMMET's closed form; keys (n, d_k), resid (n, d_out); None: C = I."""
    K = keys.double().T  # (d_k, n)
    if solver is not None:
        K = K.to(solver.factor.device)
    c_inv_k = solver.solve(K) if solver is not None else K  # C⁻¹K (d_k, n)
    D = K.T @ c_inv_k
    if len(D) > 1:
        D = D + emmet_lambda * torch.eye(len(D), dtype=D.dtype, device=D.device)  # conditioning of D
    return resid.to(K.device, torch.float64).T @ torch.linalg.solve(D, c_inv_k.T)  # R D⁻¹ KᵀC⁻¹ (D symmetric)


class EMMET(MEMIT):
    """Batched equality-constrained edit of the MLP output projections (Hydra: conf/method/emmet.yaml)."""

    def __init__(self, *args: Any, emmet_lambda: float = 0.1, update_norm_lambda: float = 0.0,
                 name: str = "emmet", **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)
        if float(emmet_lambda) < 0 or float(update_norm_lambda) < 0:
            raise ConfigError(f"EMMET emmet_lambda and update_norm_lambda must be >= 0, got {emmet_lambda}, "
                              f"{update_norm_lambda}")
        self.emmet_lambda, self.update_norm_lambda = float(emmet_lambda), float(update_norm_lambda)
        self._solvers: dict[int, CovarianceSolver] = {}

    def layer_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                     factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        if C is None:
            return emmet_update(keys, resid, None, self.emmet_lambda)
        if layer not in self._solvers:  # C is fixed per model: factor it once
            C = self.mom2_update_weight * C.double()
            C = C + self.update_norm_lambda * torch.eye(len(C), dtype=C.dtype, device=C.device)
            self._solvers[layer] = CovarianceSolver(C)
        return emmet_update(keys, resid, self._solvers[layer], self.emmet_lambda)
