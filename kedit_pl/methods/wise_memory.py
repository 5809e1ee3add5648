"""WISE's side memories (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong Model
Editing of Large Language Models"): the pure state and algebra, without the model.

A side memory is a copy W_v' of one MLP output projection W_v, kept as its difference ΔW = W_v' − W_v
(float32, (d_out, d_in) orientation). Pieces here:
- the activation score Δ_act(x) = ‖A(x) · (W_v' − W_v)‖₂ (the paper's routing score, §2.2), averaged over the
  tokens of x: how much the side memory changes the layer's output for x;
- random gradient masks M_i ∈ {0,1} with a fraction ρ of ones: knowledge sharding (§2.3), each shard is written
  through its own mask;
- TIES merging (Yadav et al., NeurIPS 2023) of the shards' task vectors τ_i = ΔW_i: trim (keep the top `density`
  fraction of each τ_i by magnitude), elect the sign (sign of Σ_i trimmed τ_i), disjoint merge (mean over the τ_i
  whose trimmed entry is non-zero and has the elected sign) — WISE's knowledge merging (§2.3);
- the memory state (merged memories, closed shards of the group being written, the shard being written) with
  an exact copy for restore, and its safetensors form.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from kedit_pl.errors import ConfigError
from kedit_pl.io import read_tensors, save_tensors

FORMAT = 1


def activation_scores(acts: torch.Tensor, delta: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Δ_act per row: mean over the `valid` tokens of ‖a_t ΔWᵀ‖₂ (acts (B, T, d_in), ΔW (d_out, d_in),
    valid (B, T) bool) -> (B,) float32. Rows without a valid token score 0."""
    norms = (acts.float() @ delta.T.float()).norm(dim=-1)
    w = valid.float()
    return (norms * w).sum(-1) / w.sum(-1).clamp_min(1.0)


def random_mask(shape: tuple[int, ...], rho: float, generator: torch.Generator) -> torch.Tensor:
    """A knowledge-shard mask: each entry is 1 with probability ρ (float32 0/1)."""
    return (torch.rand(shape, generator=generator) < rho).float()


def ties_merge(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES merging of task vectors (trim, elect sign, disjoint mean); one vector whose non-zeros are within
    the kept `density` fraction merges to itself."""
    if not deltas:
        raise ValueError("ties_merge: nothing to merge")
    if not 0 < density <= 1:
        raise ConfigError(f"method.density: TIES keeps a fraction in (0, 1], got {density}")
    trimmed = []
    for d in deltas:
        d = d.float()
        k = int(density * d.numel())
        if k < d.numel():
            keep = torch.zeros(d.numel(), dtype=torch.bool)
            keep[d.abs().flatten().topk(max(k, 1)).indices] = True
            d = d * keep.view(d.shape)
        trimmed.append(d)
    stack = torch.stack(trimmed)
    sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)                    # elect: the sign of the total mass
    agree = (stack.sign() == sign).float()                              # zero entries never agree
    return (stack * agree).sum(0) / agree.sum(0).clamp_min(1.0)         # disjoint mean


@dataclass
class Memory:
    """One side memory: ΔW = W_v' − W_v, the smallest Δ_act of its edits when they were written (its routing
    threshold is act_ratio × that), and how many edits it holds."""

    delta: torch.Tensor
    min_act: float = float("inf")
    n_edits: int = 0


@dataclass
class WiseState:
    """Everything WISE holds besides the frozen model. Tensors of `memories` and `shards` are never changed in
    place (a merge makes new ones), so `copy()` only clones the shard being written."""

    memories: list[Memory] = field(default_factory=list)  # merged side memories (WISE-Merge keeps at most one)
    shards: list[Memory] = field(default_factory=list)    # closed shards of the group not yet merged
    current: Memory | None = None                         # the shard being written
    mask: torch.Tensor | None = None                      # its gradient mask
    n_edits: int = 0                                      # edits written so far (decides shard / merge boundaries)

    def copy(self) -> "WiseState":
        """A deep copy (what restore puts back, bit-exactly)."""
        cur = None if self.current is None else replace(self.current, delta=self.current.delta.clone())
        return WiseState(list(self.memories), list(self.shards), cur,
                         None if self.mask is None else self.mask.clone(), self.n_edits)

    def candidates(self) -> list[Memory]:
        """Every memory routing may pick: merged memories, closed shards, and the current shard once it holds edits."""
        live = [self.current] if self.current is not None and self.current.n_edits else []
        return [*self.memories, *self.shards, *live]

    def empty(self) -> bool:
        """True while no edit has been written to a side memory."""
        return not self.candidates()

    # --- saved side memory (safetensors + JSON metadata) -------------------------------------------------
    def save(self, path: str | Path, info: dict) -> Path:
        """Write the side memories and their thresholds to `path` (safetensors, atomically)."""
        tensors, meta = {}, {"format": FORMAT, **info, "n_edits": self.n_edits, "memories": [], "shards": []}
        for kind, items in (("memories", self.memories), ("shards", self.shards)):
            for i, m in enumerate(items):
                tensors[f"{kind}.{i}"] = m.delta.contiguous()
                meta[kind].append({"min_act": m.min_act, "n_edits": m.n_edits})
        if self.current is not None:
            tensors["current"] = self.current.delta.contiguous()
            meta["current"] = {"min_act": self.current.min_act, "n_edits": self.current.n_edits}
        if self.mask is not None:
            tensors["mask"] = self.mask.contiguous()
        path = Path(path)
        save_tensors(path, tensors, metadata={"wise": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple["WiseState", dict]:
        """Read what `save` wrote: the state and its info (one-line error on a damaged file)."""
        tensors, raw = read_tensors(path, "method.memory_load")
        try:
            meta = json.loads(raw["wise"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')}, expected {FORMAT}")

            def mem(key: str, m: dict) -> Memory:
                return Memory(tensors[key], float(m["min_act"]), int(m["n_edits"]))

            state = cls([mem(f"memories.{i}", m) for i, m in enumerate(meta["memories"])],
                        [mem(f"shards.{i}", m) for i, m in enumerate(meta["shards"])],
                        mem("current", meta["current"]) if "current" in meta else None,
                        tensors.get("mask"), int(meta["n_edits"]))
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"method.memory_load: {path} is not a WISE side memory ({type(e).__name__}: {e})") from None
        return state, meta
