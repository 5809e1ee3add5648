"""Per-example loss gradients with respect to chosen linear weights, as vectors, batched and cached on disk.

For a linear map y = W x applied at every token t, the gradient of one example's loss is the sum of outer
products ∇W = Σ_t δ_t x_tᵀ (δ_t = ∂loss/∂y_t). One forward/backward of the *sum* of a batch's per-example
losses yields every example's δ_t (examples do not interact), captured at the layer outputs together with the
inputs x_t; no weight gradient is ever accumulated.

A full ∇W of SmolLM2's MLP output projection has 576 × 1536 entries, too many to keep for thousands of documents.
`projection: kronecker` stores the LoGra-style (Choe et al. 2024) Kronecker-factored random projection
    P_out ∇W P_inᵀ = Σ_t (P_out δ_t)(P_in x_t)ᵀ          (k_out × k_in per weight)
with seeded Gaussian P_out (k_out × d_out), P_in (k_in × d_in) of variance 1/k, so that
E[<P_out G P_inᵀ, P_out H P_inᵀ>] = <G, H>: dot products (and cosines) of projected gradients estimate the exact
ones without bias. It is computed from the projected δ and x without forming ∇W. `projection: none` keeps ∇W
exactly (small models, tests).
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from kedit_pl.errors import ConfigError
from kedit_pl.io import cache_root
from kedit_pl.locate.influence.batches import encode_examples, example_losses, length_batches, token_lengths

PROJECTIONS = ("kronecker", "none")


class GradientFeaturizer:
    """Vectors of per-example gradients w.r.t. `names` (weight parameter names of linear layers)."""

    def __init__(self, model: nn.Module, tok, names: Sequence[str], projection: str = "kronecker",
                 proj_in: int = 32, proj_out: int = 32, seed: int = 0, batch_size: int = 16,
                 max_tokens: int = 48) -> None:
        if projection not in PROJECTIONS:
            raise ConfigError(f"locate.method.projection: {projection!r}; choose one of {PROJECTIONS}")
        if projection == "kronecker" and (proj_in < 1 or proj_out < 1):
            raise ConfigError(f"locate.method.proj_in/proj_out: must be >= 1, got {proj_in}/{proj_out}")
        self.model, self.tok, self.names = model, tok, list(names)
        self.projection, self.proj_in, self.proj_out, self.seed = projection, proj_in, proj_out, seed
        self.batch_size, self.max_tokens = batch_size, max_tokens
        params = dict(model.named_parameters())
        missing = [n for n in self.names if n not in params or not n.endswith(".weight")]
        if missing:
            raise ConfigError(f"locate.method.layers/modules: the model has no weight {missing[0]!r}")
        self.modules = [n.removesuffix(".weight") for n in self.names]
        self.shapes = []
        for n in self.modules:
            w = model.get_submodule(n).weight
            self.shapes.append(tuple(w.t().shape) if type(model.get_submodule(n)).__name__ == "Conv1D"
                               else tuple(w.shape))  # (d_out, d_in)
        self.proj = [self._projections(i, d_out, d_in) for i, (d_out, d_in) in enumerate(self.shapes)]

    def _projections(self, i: int, d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.projection == "none":
            return None
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        p_out = torch.randn(self.proj_out, d_out, generator=g) / self.proj_out ** 0.5
        p_in = torch.randn(self.proj_in, d_in, generator=g) / self.proj_in ** 0.5
        return p_out, p_in

    @property
    def dim(self) -> int:
        """Length of one example's (projected) gradient feature."""
        per = [self.proj_out * self.proj_in if p is not None else s[0] * s[1] for p, s in zip(self.proj, self.shapes)]
        return sum(per)

    def settings(self) -> dict:
        """What the vectors depend on besides the weights and the examples (part of the cache key)."""
        return {"names": self.names, "projection": self.projection, "proj_in": self.proj_in,
                "proj_out": self.proj_out, "seed": self.seed, "max_tokens": self.max_tokens, "loss": "mean-nll-v1"}

    def batch(self, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
        """(B, dim) gradient vectors of the (prompt, target) examples, one forward/backward."""
        batch = encode_examples(self.tok, pairs, self.max_tokens)
        xs: dict[str, torch.Tensor] = {}
        ys: dict[str, torch.Tensor] = {}

        def hook(name: str):
            def fn(_mod, args, out):
                x = args[0]
                xs[name] = x.detach()
                if not out.requires_grad:  # the lowest chosen layer: nothing below needs a gradient
                    out.requires_grad_(True)
                ys[name] = out
            return fn

        handles = [self.model.get_submodule(n).register_forward_hook(hook(n)) for n in self.modules]
        try:
            with torch.enable_grad():
                losses = example_losses(self.model, batch)
                deltas = torch.autograd.grad(losses.sum(), [ys[n] for n in self.modules])
        finally:
            for h in handles:
                h.remove()
        B = len(batch)
        feats = []
        for n, d, p in zip(self.modules, deltas, self.proj):
            x = xs[n].reshape(B, -1, xs[n].shape[-1])
            d = d.reshape(B, -1, d.shape[-1])
            if p is not None:  # Σ_t (P_out δ_t)(P_in x_t)ᵀ
                x, d = x @ p[1].T, d @ p[0].T
            feats.append(torch.einsum("bto,bti->boi", d, x).reshape(B, -1))
        return torch.cat(feats, 1)

    def __call__(self, pairs: Sequence[tuple[str, str]], progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """(N, dim) vectors of all examples, in batches of similar length."""
        out = torch.empty(len(pairs), self.dim)
        lengths = token_lengths(self.tok, pairs, self.max_tokens)
        for idx in length_batches(lengths, self.batch_size):
            out[idx] = self.batch([pairs[i] for i in idx])
            if progress:
                progress(len(idx))
        return out


class GradientCache:
    """Document gradient vectors on disk, per (weights, featurizer settings), in chunks of documents: a long pass
    that is interrupted resumes from its finished chunks. Entries are safetensors with a digest (`io.save_cache`);
    a damaged one is a miss and is recomputed."""

    def __init__(self, root: str | Path | None, weights_key: str, settings: dict, chunk: int = 256) -> None:
        key = hashlib.sha256(json.dumps([weights_key, settings], sort_keys=True).encode()).hexdigest()[:24]
        self.folder = cache_root(root, "gradient cache") / key if root else None
        self.chunk = chunk

    def features(self, featurizer: GradientFeaturizer, pairs: Sequence[tuple[str, str]],
                 progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, int, float]:
        """(N, dim) vectors; also how many examples were computed (not cached) and the seconds that took."""
        from kedit_pl.io import read_cache, save_cache

        parts, computed, seconds = [], 0, 0.0
        for s in range(0, len(pairs), self.chunk):
            chunk = list(pairs[s:s + self.chunk])
            path = self._path(chunk)
            hit = read_cache(path, "influence gradient cache") if path else None
            if hit is not None and hit["g"].shape == (len(chunk), featurizer.dim):
                parts.append(hit["g"])
                if progress:
                    progress(len(chunk))
                continue
            t = time.perf_counter()
            g = featurizer(chunk, progress)
            seconds += time.perf_counter() - t
            computed += len(chunk)
            if path:
                save_cache(path, {"g": g})
            parts.append(g)
        return torch.cat(parts), computed, seconds

    def _path(self, chunk: list[tuple[str, str]]) -> Path | None:
        if self.folder is None:
            return None
        h = hashlib.sha256(json.dumps(chunk).encode()).hexdigest()[:24]
        return self.folder / f"{h}.safetensors"
