"""ROME: Rank-One Model Editing (Meng et al., NeurIPS 2022).

Per request: k* = mean key over the context templates (eq. 3, kv/keys.py); δ from the value optimization
(eq. 4, kv/values.py); then the rank-one update of eq. 2, in float64,

    W' = W + Λ (C⁻¹k*)ᵀ,   Λ = (v − W k − b) / ((C⁻¹k*)ᵀ k),   v = W k + b + δ,

which makes W'k + b = v exactly. The key k where the constraint is enforced is `constraint_key`:
- "plain" (default): the key of the unprefixed rewrite prompt, as ROME's released code does (its right vector
  divides by the plain prompt's key); the rewrite prompt then gets exactly the optimized δ;
- "mean": k = k*, eq. 2 read literally; v = W k* + b + δ is the mean of the optimized outputs over templates.
The direction C⁻¹k* is the same in both. C = E[kkᵀ] comes from kv/stats.py. With `mom2_update_weight` λ > 0
the denominator becomes λ + (C⁻¹k*)ᵀk (Sherman–Morrison form of MEMIT's (λC + kkᵀ)⁻¹ for one key): a softer
edit that no longer hits v exactly; λ = 0 is ROME. Requests are applied one after another (single-edit method).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed, KEditError
from kedit_pl.kv.context import DEFAULT_LENGTHS, context_templates
from kedit_pl.kv.keys import subject_prompts, template_keys
from kedit_pl.kv.precision import compute_dtype as resolve_dtype
from kedit_pl.kv.stats import StatsConfig, model_fingerprint, second_moment
from kedit_pl.kv.values import optimize_values, warm_compute_dtype
from kedit_pl.methods.base import EditMethod
from kedit_pl.models.spec import ModelSpec, linear_weight


def rank_one_update(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c_inv_k: torch.Tensor,
                    bias: torch.Tensor | None = None, mom2_update_weight: float = 0.0) -> torch.Tensor:
    """ΔW (out, in) in float64 from ROME eq. 2: Λ (C⁻¹k)ᵀ with Λ = (v − W k − b) / ((C⁻¹k)ᵀ k [+ λ])."""
    return torch.outer(*rank_one_factors(W, k, v, c_inv_k, bias, mom2_update_weight))


def rank_one_factors(W: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c_inv_k: torch.Tensor,
                     bias: torch.Tensor | None = None, mom2_update_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(Λ, C⁻¹k) of eq. 2, float64: ΔW = Λ (C⁻¹k)ᵀ."""
    W64 = W.double()
    k64, u = k.to(W64.device, torch.float64), c_inv_k.to(W64.device, torch.float64)
    out = W64 @ k64 + (bias.to(W64.device, torch.float64) if bias is not None else 0.0)
    denom = u @ k64 + mom2_update_weight
    if not torch.isfinite(denom) or denom.abs() < 1e-12:
        raise EditFailed(f"rank-one update: degenerate denominator (C⁻¹k)ᵀk = {denom.item():.3g}")
    return (v.to(W64.device, torch.float64) - out) / denom, u


class CovarianceSolver:
    """C⁻¹x via a float64 Cholesky factor of C (a tiny ridge is added only if C is not positive definite)."""

    def __init__(self, C: torch.Tensor) -> None:
        C = C.double()
        if not (torch.isfinite(C).all() and C.diagonal().mean() > 0):  # else the ridge loop below never ends
            raise EditFailed("key second moment C has non-finite entries or a non-positive trace (damaged statistics?)")
        C = (C + C.T) / 2
        factor, info = torch.linalg.cholesky_ex(C)
        ridge = 0.0
        while info.item() != 0:
            ridge = max(ridge * 10, 1e-8 * C.diagonal().mean().item())
            factor, info = torch.linalg.cholesky_ex(C + ridge * torch.eye(len(C), dtype=C.dtype, device=C.device))
            if ridge > 1e-2 * C.diagonal().mean().item():
                raise EditFailed("key second moment C is far from positive definite; use more stats samples")
        self.factor, self.ridge = factor, ridge

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """C⁻¹x in float64, on the factor's device."""
        x = x.to(self.factor.device, torch.float64)
        return torch.cholesky_solve(x.reshape(len(self.factor), -1), self.factor).reshape(x.shape)


class ROME(EditMethod):
    """Rank-one edit of the MLP output projection at `layer` (Hydra: conf/method/rome.yaml)."""

    def __init__(self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 spec: ModelSpec | None = None, layer: int | None = None, loss_layer: int | None = None,
                 v_num_grad_steps: int = 20, v_lr: float = 0.5, v_weight_decay: float = 0.5,
                 clamp_norm_factor: float = 4.0, kl_factor: float = 0.0625, stop_loss: float = 5e-2,
                 mom2_adjustment: bool = True, mom2_update_weight: float = 0.0,
                 context_template_length_params: Sequence[Sequence[int]] = DEFAULT_LENGTHS, context_seed: int = 0,
                 fast: bool = True, stats: StatsConfig | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, constraint_key: str = "plain", compute_dtype: str = "float32",
                 name: str = "rome") -> None:
        super().__init__(model, tokenizer, spec)
        if layer is None:
            raise ConfigError("ROME needs an edit layer: set method.layer or model.method_defaults.rome.layer")
        if spec is not None and not 0 <= int(layer) < spec.n_layers:
            raise ConfigError(f"ROME layer {layer} out of range 0..{spec.n_layers - 1} for {spec.name}")
        if mom2_adjustment and stats is None:
            raise ConfigError("ROME with mom2_adjustment needs a `stats` config (conf/stats/*.yaml)")
        self.name = name
        if constraint_key not in ("plain", "mean"):
            raise ConfigError(f"ROME constraint_key must be 'plain' or 'mean', got {constraint_key!r}")
        self.constraint_key = constraint_key
        self.layer, self.loss_layer = int(layer), None if loss_layer is None else int(loss_layer)
        self.hp = dict(steps=int(v_num_grad_steps), lr=float(v_lr), weight_decay=float(v_weight_decay),
                       clamp_norm_factor=float(clamp_norm_factor), kl_factor=float(kl_factor),
                       stop_loss=float(stop_loss))
        resolve_dtype(compute_dtype)  # a bad value fails here, before any model work
        if compute_dtype != "float32":  # absent at float32, so MEMIT z caches keyed before this option stay valid
            self.hp["compute_dtype"] = compute_dtype
        self.mom2_adjustment, self.mom2_update_weight = bool(mom2_adjustment), float(mom2_update_weight)
        self.lengths = [tuple(int(x) for x in p) for p in context_template_length_params]
        self.context_seed, self.fast = int(context_seed), bool(fast)
        self.stats = StatsConfig.from_any(stats) if stats is not None else None
        self.cache_dir = cache_dir or (self.stats.cache_dir if self.stats else None)
        self._fingerprint: str | None = None
        self._solver: CovarianceSolver | None = None

    # --- cached per model ---------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Digest of the unedited weights, taken on first use (cache key for stats and templates)."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def templates(self) -> list[str]:
        """The context templates (prefixes) that k* is averaged over, cached per model."""
        d = Path(self.cache_dir) / self.spec.name if self.cache_dir else None
        return context_templates(self.model, self.tok, f"{self.spec.name}:{self.fingerprint}", self.lengths,
                                 self.context_seed, d)

    def solver(self) -> CovarianceSolver | None:
        """The solver for C = E[kkᵀ] at the edit layer (None without `mom2_adjustment`), built once."""
        if self.mom2_adjustment and self._solver is None:
            C = second_moment(self.model, self.tok, self.spec, [self.layer], self.stats, self.fingerprint)[self.layer]
            self._solver = CovarianceSolver(C)
        return self._solver

    # --- EditMethod -------------------------------------------------------------------------------
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return [self.spec.weight_name("mlp_out", self.layer)]

    def prepare(self) -> None:
        """Compute the per-model caches (fingerprint, templates, C, bf16 weight copies) before the first, timed edit."""
        self.templates()
        self.solver()
        self.warm_values()

    def warm_values(self) -> None:
        """The value optimization's low-precision weight copies (`compute_dtype`; nothing at float32)."""
        warm_compute_dtype(self.model, self.spec, self.layer, self.loss_layer, self.hp.get("compute_dtype", "float32"))

    def prepare_data(self) -> None:
        """Lightning hook, run by one process per node while the other ranks wait: under DDP the disk caches
        (statistics, templates) are built once, and the other ranks read them in `on_test_start`."""
        self.prepare()

    def on_test_start(self) -> None:
        """Lightning hook: build the caches before the first edit so edit timings exclude them."""
        self.prepare()

    def context_tokens(self) -> int:
        """The longest context template's generated tokens, plus its joining '. ' and a BOS."""
        return max((length for length, _ in self.lengths), default=0) + 2

    def request_problem(self, req: EditRequest) -> str | None:
        """Also: the subject must tokenize the same inside every context template (its last token is k*'s site)."""
        problem = super().request_problem(req)
        if problem is None:
            try:
                subject_prompts(self.tok, [req], self.templates())
            except EditFailed as e:
                problem = str(e)
        return problem

    def check_and_prepare(self, requests: list[EditRequest]) -> None:
        """Reject invalid requests as EditFailed (model untouched), then build the per-model caches."""
        for req in requests:
            try:
                req.validate()
            except KEditError as e:
                raise EditFailed(str(e)) from None
        self.prepare()
        subject_prompts(self.tok, requests, self.templates())  # every subject locatable, before any compute

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        self.check_and_prepare(requests)
        info: dict[str, Any] = {"per_request": []}
        for req in requests:
            info["per_request"].append(self.edit_one(req))
        return info

    @torch.no_grad()
    def _write_update(self, delta_w: torch.Tensor) -> None:
        W = linear_weight(self.spec.module(self.model, "mlp_out", self.layer))
        W.add_(delta_w.to(device=W.device, dtype=W.dtype))

    def edit_one(self, req: EditRequest) -> dict[str, Any]:
        """Compute and write one rank-one update; returns diagnostics."""
        templates = self.templates()
        # the keys k(x_j + s) come with the values, read in the value optimization's caching pass
        res = optimize_values(self.model, self.tok, self.spec, [req], templates, self.layer, insert="mlp_out",
                              loss_layer=self.loss_layer, fast=self.fast, **self.hp)
        keys = res.keys[0] if res.keys is not None else \
            template_keys(self.model, self.tok, self.spec, self.layer, [req], templates)[0]  # values without keys
        k_star = keys.mean(0)  # eq. 3
        module = self.spec.module(self.model, "mlp_out", self.layer)
        # eq. 2 in float64 on the weight's device (no host round trip), then written back in the model's dtype
        W = linear_weight(module).detach()
        dev = W.device
        b = module.bias.detach() if getattr(module, "bias", None) is not None else None
        k_star, delta = k_star.to(dev, torch.float64), res.delta[0].to(dev, torch.float64)
        k = k_star if self.constraint_key == "mean" else keys[templates.index("{}")].to(dev, torch.float64)
        solver = self.solver()
        c_inv_k = solver.solve(k_star) if solver is not None else k_star
        v = W.double() @ k + (b.double() if b is not None else 0.0) + delta  # v* at the constrained key
        lam, u = rank_one_factors(W, k, v, c_inv_k, b, self.mom2_update_weight)
        delta_w = torch.outer(lam, u)
        self._write_update(delta_w)
        self.record_low_rank(self.spec.module_name("mlp_out", self.layer), lam[:, None], u[None, :])  # for patches
        return {"case_id": req.case_id, "nll": res.nll[0].item(), "kl": res.kl[0].item(), "steps": res.steps[0],
                "delta_norm": delta.norm().item(), "v_norm": res.v_init[0].norm().item(),
                "update_norm": delta_w.norm().item(), "value_seconds": res.seconds}
