"""AlphaEdit: null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT's machinery (z at the top layer of the range, keys, residual spread over the layers, methods/memit.py)
with a different per-layer update. With P the projector onto the null space of the preserved keys K₀
(kv/nullspace.py) and K_p the keys of every earlier edit of a sequential run, eq. 9 of the paper (as the
reference code solves it):

    Δᵀ = (P (K₁K₁ᵀ + K_pK_pᵀ) + λI)⁻¹ P K₁ Rᵀ,       (keys as columns, λ = `l2`)

so Δ = X P for some X and Δ K₀ ≈ 0: the outputs of preserved keys stay as they were, with no C₀ penalty in
the objective. After every layer is updated the new edits' keys (recomputed on the edited model) join K_p.
Undoing an edit (`restore`) also forgets its keys.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.kv.keys import LayerKeys, compute_keys
from kedit_pl.kv.nullspace import AccumulatedKeys, NullSpace, cached_null_space
from kedit_pl.kv.stats import cache_key
from kedit_pl.methods.base import EditHandle
from kedit_pl.methods.memit import MEMIT

log = logging.getLogger(__name__)


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, P: torch.Tensor, prev: torch.Tensor | None,
                     l2: float) -> torch.Tensor:
    """ΔW (d_out, d_k) in float64 from AlphaEdit eq. 9; keys (n, d_k), resid (n, d_out), prev = K_pK_pᵀ."""
    K, P = keys.to(P.device, torch.float64).T, P.double()  # (d_k, n), on P's device (the model's, unless offloaded)
    M = K @ K.T if prev is None else K @ K.T + prev.to(K.device, torch.float64)
    A = P @ M + l2 * torch.eye(len(K), dtype=torch.float64, device=K.device)
    return torch.linalg.solve(A, P @ K @ resid.to(K.device, torch.float64)).T


class AlphaEdit(MEMIT):
    """MEMIT with the null-space projected update (Hydra: conf/method/alphaedit.yaml)."""

    def __init__(self, *args: Any, nullspace_threshold: float = 2e-2, nullspace_mode: str = "absolute",
                 l2: float = 10.0, accumulate_keys: bool = True, name: str = "alphaedit", **kwargs: Any) -> None:
        super().__init__(*args, name=name, **kwargs)
        if not self.mom2_adjustment:
            raise ConfigError("AlphaEdit needs the key statistics (mom2_adjustment=true): P comes from E[kkᵀ]")
        if not float(l2) > 0:
            raise ConfigError(f"AlphaEdit l2 (λ in eq. 9) must be > 0, got {l2}")
        self.threshold, self.mode, self.l2 = float(nullspace_threshold), nullspace_mode, float(l2)
        self.accumulate_keys = bool(accumulate_keys)
        self.keys = AccumulatedKeys()
        self._null: dict[int, NullSpace] | None = None

    def null_spaces(self) -> dict[int, NullSpace]:
        """P per layer, computed once per model (cached on disk beside the statistics)."""
        if self._null is None:
            mom2 = self.mom2()
            self._null = {layer: cached_null_space(mom2[layer], cache_key(self.spec, self.fingerprint, layer,
                                                                          self.stats, self.tok),
                                                   self.threshold, self.mode, self.stats.cache_dir, layer)
                          for layer in self.layers}
            log.info("AlphaEdit null space per layer (directions kept, key energy leak): %s",
                     {k: f"{v.kept}/{v.dim}, {v.leak:.2%}" for k, v in self._null.items()})
        return self._null

    def prepare(self) -> None:
        super().prepare()
        self.null_spaces()  # a threshold keeping none or all directions fails here, before any edit

    def layer_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                     factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        prev = self.keys.get(layer, keys.shape[1], keys.device) if self.keys.count else None
        return alphaedit_update(keys, resid, self.null_spaces()[layer].projector, prev, self.l2)

    def after_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        if self.accumulate_keys:
            templates = self.templates()
            # no weight changes between these reads: LayerKeys runs each block once (kv/keys.py)
            lk = LayerKeys(self.model, self.tok, self.spec, requests, templates) \
                if self.fast and "{}" in templates else None
            for layer in self.layers:  # the new keys, on the model with every layer updated (reference code)
                self.keys.add(layer, lk.keys(layer, self.key_groups) if lk else
                              compute_keys(self.model, self.tok, self.spec, layer, requests, templates,
                                           groups=self.key_groups))
            self.keys.count += len(requests)
        null = self.null_spaces()
        return {"accumulated_edits": self.keys.count,
                "nullspace_kept_fraction": [round(null[x].kept_fraction, 4) for x in self.layers],
                "nullspace_leak": [round(null[x].leak, 6) for x in self.layers]}

    # --- a sequential run's checkpoint holds the accumulated keys (sequential_state.py) ------------------------
    def sequential_state(self) -> dict[str, torch.Tensor]:
        sums, count = self.keys.state()
        return {f"kp_sum.{layer}": s for layer, s in sums.items()} | {"kp_count": torch.tensor(count)}

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        sums = {int(k.removeprefix("kp_sum.")): v for k, v in state.items() if k.startswith("kp_sum.")}
        self.keys.load((sums, int(state["kp_count"])))

    # --- the restore contract covers the accumulated keys too -------------------------------------------
    def apply(self, requests: list[EditRequest]) -> EditHandle:
        before = self.keys.state()
        try:
            handle = super().apply(requests)
        except BaseException:
            self.keys.load(before)
            raise
        handle.method_state = before
        return handle

    def restore(self, handle: EditHandle) -> None:
        super().restore(handle)
        if handle.method_state is not None:
            self.keys.load(handle.method_state)
