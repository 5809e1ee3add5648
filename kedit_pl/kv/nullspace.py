"""Null-space projection and accumulated keys for lifelong editing (AlphaEdit, Fang et al., ICLR 2025).

P projects onto the approximate null space of the preserved keys K₀ (§3.1): with the eigendecomposition
E[kkᵀ] = U Λ Uᵀ of the uncentred second moment (kv/stats.py, an expectation, not a raw sum), keep the
eigenvectors Û whose eigenvalues fall below a threshold and set P = Û Ûᵀ (eq. 7 of the paper; the reference
code uses the absolute threshold 2e-2). Then ‖P K₀‖²_F / N = Σ of the dropped eigenvalues: any update of the
form ΔW = X P leaves the outputs W k₀ of preserved keys (nearly) unchanged.

The threshold is absolute (`mode="absolute"`: eigenvalue < t) or relative to the spectrum (`mode="relative"`:
eigenvalue < t · λ_max). A threshold that keeps no direction (nothing can be edited) or every direction
(P = I: AlphaEdit becomes MEMIT without C₀) is a ConfigError, raised before any edit.

`AccumulatedKeys` holds Σ K_p K_pᵀ of all earlier edits per layer (eq. 9's K_p K_pᵀ term) for sequential runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kedit_pl.errors import ConfigError
from kedit_pl.io import read_cache, save_cache

THRESHOLD_MODES = ("absolute", "relative")


@dataclass(frozen=True)
class NullSpace:
    """P = Û Ûᵀ (d, d) float64 for one layer, and how much of the key space it keeps."""

    projector: torch.Tensor
    kept: int  # null-space directions kept (rank of P)
    dim: int  # key dimension d
    threshold: float  # the absolute eigenvalue cut actually applied
    leak: float  # ‖P K₀‖²_F / ‖K₀‖²_F = Σ kept eigenvalues / tr E[kkᵀ]: the key energy an update can still touch

    @property
    def kept_fraction(self) -> float:
        """Fraction of the key dimensions the projector keeps."""
        return self.kept / self.dim


def null_space(C: torch.Tensor, threshold: float, mode: str = "absolute", layer: int | str = "?") -> NullSpace:
    """P from the eigenvectors of the symmetric C whose eigenvalues fall below the threshold (AlphaEdit eq. 7)."""
    if mode not in THRESHOLD_MODES:
        raise ConfigError(f"nullspace_mode must be one of {THRESHOLD_MODES}, got {mode!r}")
    if not float(threshold) > 0:
        raise ConfigError(f"nullspace_threshold must be > 0, got {threshold}")
    C = C.double()
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    cut = float(threshold) * (evals.max().item() if mode == "relative" else 1.0)
    keep = evals < cut
    kept, dim = int(keep.sum()), len(evals)
    where = f"layer {layer}: eigenvalues of E[kkᵀ] span [{evals.min().item():.3g}, {evals.max().item():.3g}]"
    if kept == 0:
        raise ConfigError(f"nullspace_threshold={threshold} ({mode}) keeps no direction at {where}; "
                          f"raise it (nothing could be edited)")
    if kept == dim:
        raise ConfigError(f"nullspace_threshold={threshold} ({mode}) keeps all {dim} directions at {where}; "
                          f"lower it (P = I would make AlphaEdit MEMIT without C₀)")
    U = evecs[:, keep]
    leak = (evals[keep].clamp(min=0).sum() / evals.clamp(min=0).sum()).item()
    return NullSpace(U @ U.T, kept, dim, cut, leak)


def cached_null_space(C: torch.Tensor, stats_key: dict, threshold: float, mode: str, cache_dir: str | None,
                      layer: int) -> NullSpace:
    """`null_space`, cached as safetensors beside the statistics it comes from (keyed by their cache key)."""
    if not cache_dir:
        return null_space(C, threshold, mode, layer)
    key = {"stats": stats_key, "threshold": float(threshold), "mode": mode}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir) / str(stats_key["model"]) / f"nullspace_L{layer}_{digest}.safetensors"
    t = read_cache(path, "null-space projector cache")
    if t is not None:
        return NullSpace(t["projector"].to(C.device), int(t["kept"]), int(t["dim"]), float(t["threshold"]), float(t["leak"]))
    ns = null_space(C, threshold, mode, layer)
    save_cache(path, {"projector": ns.projector, "kept": torch.tensor(ns.kept), "dim": torch.tensor(ns.dim),
                        "threshold": torch.tensor(ns.threshold, dtype=torch.float64),
                        "leak": torch.tensor(ns.leak, dtype=torch.float64)},
                 metadata={"key": json.dumps(key)})
    return ns


class AccumulatedKeys:
    """Σ K_p K_pᵀ (d, d) float64 per layer over the edits made so far in a sequential run.

    Updates are out of place, so `state()` is a cheap snapshot and `load(state)` an exact rollback (the
    restore contract: undoing an edit also forgets its keys).
    """

    def __init__(self) -> None:
        self._sums: dict[int, torch.Tensor] = {}
        self.count = 0

    def get(self, layer: int, dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Σ kkᵀ of the keys accumulated at `layer` (zeros before the first edit), in float64."""
        s = self._sums.get(layer)
        return torch.zeros(dim, dim, dtype=torch.float64, device=device) if s is None else s.to(device)

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Add the keys (n, d) of one layer (one row per edit)."""
        K = keys.detach().double()  # K_pK_pᵀ stays where the keys are (the model's device): no per-edit host trip
        outer = K.T @ K
        self._sums[layer] = outer if layer not in self._sums else self._sums[layer].to(K.device) + outer

    def state(self) -> tuple[dict[int, torch.Tensor], int]:
        """The sums and the edit count, for a sequential checkpoint."""
        return dict(self._sums), self.count

    def load(self, state: tuple[dict[int, torch.Tensor], int]) -> None:
        """Restore the sums and the edit count from `state`."""
        self._sums, self.count = dict(state[0]), state[1]
