"""MEND's editor networks (Mitchell et al. 2022, "Fast Model Editing at Scale", §3.1).

For a weight W (d_out × d_in) the fine-tuning gradient is a sum of rank-1 terms, ∇W = Σ_t δ_t u_tᵀ
(u_t: the layer input at token t, δ_t: the gradient of the loss w.r.t. the layer output). The editor g
maps each (u_t, δ_t) to (ũ_t, δ̃_t) and the edit is  W̃ = W − α_ℓ Σ_t δ̃_t ũ_tᵀ  (MEND's pseudo-gradient
∇̃W_ℓ = δ̃ ũᵀ with a learned per-layer step size α_ℓ). g is one MLP per weight *shape*, shared by the
layers of that shape; a per-layer scale s_ℓ and shift o_ℓ make it layer-specific (the paper's editor MLP):
    h = z + σ(s¹_ℓ ⊙ (U₁V₁z + b₁) + o¹_ℓ),   g(z) = h + σ(s²_ℓ ⊙ (U₂V₂h + b₂) + o²_ℓ),   z = [u; δ]
with z normalized by running mean/std of the training inputs. U is initialized to zero, so g is the
identity (on normalized inputs) at the start of training. σ is clamp(·, min=0) as in the reference code's
LRLinear (on every layer, the last included: its `relu` flag is unused): the same values as a ReLU, but a
gradient of 1 at exactly 0. With U = 0 and b = 0 every pre-activation starts at exactly 0, where torch.relu's
gradient is 0: U, b, s_ℓ and o_ℓ would never move and only α_ℓ would learn.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import nn

from kedit_pl.errors import EditFailed

#: per edited parameter: the token rows (u, δ) of its gradient, shapes (N, d_in) and (N, d_out)
Rows = dict[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class EditorConfig:
    """Everything that fixes the editor's architecture; saved next to its weights."""

    params: tuple[tuple[str, int, int], ...]  # (parameter name, d_out, d_in) of every edited weight
    rank: int = 1920
    n_hidden: int = 1
    norm: bool = True
    edit_lr: float = 1e-4  # initial α_ℓ

    def to_dict(self) -> dict:
        """The config as JSON-ready data."""
        return asdict(self) | {"params": [list(p) for p in self.params]}

    def arch(self) -> tuple:
        """What must match for weights to load (edit_lr is only the initial α)."""
        return self.params, self.rank, self.n_hidden, self.norm

    @classmethod
    def from_dict(cls, d: dict) -> "EditorConfig":
        """Rebuild a config from `to_dict`'s data."""
        return cls(params=tuple((str(n), int(o), int(i)) for n, o, i in d["params"]), rank=int(d["rank"]),
                   n_hidden=int(d["n_hidden"]), norm=bool(d["norm"]), edit_lr=float(d["edit_lr"]))


class LowRankResidual(nn.Module):
    """One residual layer of the editor MLP: z + σ(s_ℓ ⊙ (U V z + b) + o_ℓ), σ = clamp(·, min=0); U = 0 at init:
    the identity, with a gradient for U, b, s_ℓ, o_ℓ from the first step."""

    def __init__(self, dim: int, rank: int, n_modes: int) -> None:
        super().__init__()
        r = min(rank, dim)
        self.U = nn.Parameter(torch.zeros(dim, r))
        self.V = nn.Parameter(torch.randn(r, dim))
        self.b = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))   # s_ℓ
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))  # o_ℓ

    def forward(self, z: torch.Tensor, mode: int) -> torch.Tensor:
        pre = (z @ self.V.T) @ self.U.T + self.b
        return z + (self.scale[mode] * pre + self.shift[mode]).clamp(min=0)  # not relu: gradient 1 at 0


class GradientEditor(nn.Module):
    """g for all edited weights of one shape: running input normalization + residual low-rank MLP."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int, norm: bool) -> None:
        super().__init__()
        self.d_in, self.d_out, self.norm = d_in, d_out, norm
        dim = d_in + d_out
        self.layers = nn.ModuleList(LowRankResidual(dim, rank, n_modes) for _ in range(n_hidden + 1))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))  # Σ (z − mean)², for the variance
        #: under DDP: gathers a tensor from every rank, (world, ...) (the strategy's all_gather), so every rank merges
        #: every rank's rows, as one process with the whole batch would; None in one process
        self.gather: Callable[[torch.Tensor], torch.Tensor] | None = None

    @torch.no_grad()
    def update_stats(self, z: torch.Tensor) -> None:
        """Merge a batch of rows into the running mean/variance (Chan et al.'s parallel Welford update); under DDP
        the batch is every rank's rows (their (n, mean, M2) gathered and merged in rank order)."""
        n = z.shape[0]
        b_mean = z.mean(0) if n else torch.zeros_like(self.mean)
        b_m2 = ((z - b_mean) ** 2).sum(0)
        if self.gather is not None:  # every rank calls this, even with no rows, so the collective always matches
            parts = self.gather(torch.cat([z.new_tensor([n]), b_mean, b_m2]))
            for part in parts:
                self._merge(float(part[0]), *part[1:].split(len(self.mean)))
        elif n:
            self._merge(float(n), b_mean, b_m2)

    def _merge(self, n: float, b_mean: torch.Tensor, b_m2: torch.Tensor) -> None:
        if n == 0:
            return
        total = self.count + n
        diff = b_mean - self.mean
        self.mean += diff * (n / total)
        self.m2 += b_m2 + diff ** 2 * (self.count * n / total)
        self.count.fill_(total)

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Standardize inputs with the running mean and std (when `norm` is on); fails on an untrained editor."""
        if not self.norm:
            return z
        if self.count < 2:
            raise EditFailed("MEND editor has no input statistics yet (untrained); train it or load a checkpoint")
        std = (self.m2 / (self.count - 1)).sqrt()
        return (z - self.mean) / (std + 1e-7)

    def forward(self, u: torch.Tensor, delta: torch.Tensor, mode: int) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.cat([u, delta], dim=-1).float()
        if self.training and self.norm:
            self.update_stats(z)
        z = self.normalize(z)
        for layer in self.layers:
            z = layer(z, mode)
        return z.split([self.d_in, self.d_out], dim=-1)


class MendEditor(nn.Module):
    """All of MEND's learned state: one GradientEditor per weight shape, and the step sizes α_ℓ."""

    def __init__(self, cfg: EditorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        by_shape: dict[str, list[str]] = {}
        for name, d_out, d_in in cfg.params:
            by_shape.setdefault(f"{d_out}x{d_in}", []).append(name)
        self.route = {name: (f"{o}x{i}", by_shape[f"{o}x{i}"].index(name)) for name, o, i in cfg.params}
        self.nets = nn.ModuleDict({
            key: GradientEditor(int(key.split("x")[1]), int(key.split("x")[0]), len(names), cfg.rank,
                                cfg.n_hidden, cfg.norm)
            for key, names in by_shape.items()})
        self.alpha = nn.Parameter(torch.full((len(cfg.params),), float(cfg.edit_lr)))

    def share_statistics(self, gather: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """DDP: normalization statistics from every rank's rows (`gather`: the strategy's all_gather); None: own."""
        for net in self.nets.values():
            net.gather = gather

    def weight_deltas(self, rows: Rows, owner: torch.Tensor, n_edits: int) -> dict[str, torch.Tensor]:
        """ΔW_ℓ = −α_ℓ Σ_t δ̃_t ũ_tᵀ per parameter and edit, shape (n_edits, d_out, d_in), from the token rows
        u (N, d_in), δ (N, d_out) of all edits; row t belongs to edit owner[t]."""
        out = {}
        for idx, (name, _, _) in enumerate(self.cfg.params):
            u, delta = rows[name]
            keep = (u != 0).any(-1) & (delta != 0).any(-1)  # rows with no gradient (padding) carry no edit
            key, mode = self.route[name]
            u_t, d_t = self.nets[key](u[keep], delta[keep], mode)
            own = owner[keep]
            out[name] = -self.alpha[idx] * torch.stack([d_t[own == e].T @ u_t[own == e] for e in range(n_edits)])
        return out
