"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023, Algorithm 1).

1. z_i = h_i^L + δ_i for every request (eq. 16): δ optimized at the *output of the last block L* of the layer
   range R (the residual stream, `optimize_values(insert="layer")`), batched over requests.
2. For each layer l ∈ R from low to high, with the lower layers already updated:
   K = keys at l at the subject's last token, averaged over the context templates (kv/keys.py; by default as
   the reference code does: the plain prompt and the sampled prefixes carry half the weight each);
   H = current block-L outputs on the plain prompts; residual R = (Z − H) / (|R| − i) (spread over the
   remaining layers); update of eq. 14

       Δ = R Kᵀ (λ C₀ + K Kᵀ)⁻¹,

   the minimizer of ‖Δ K − R‖² + λ tr(Δ C₀ Δᵀ), in float64, added to the MLP output projection at l.
   Where the block norms the MLP output before the residual add (`spec.mlp_post_norm`, Gemma 2/3), R is first
   turned into the change of the MLP output that moves the normed output by R (kv/post_norm.py).

C₀ here is E[kkᵀ] (kv/stats.py), as in the reference implementation (its `mom2_update_weight` multiplies the
normalized second moment, e.g. λ = 15000 for GPT-J), so λ carries over unchanged. MEMIT reuses ROME's
machinery: templates, fingerprint, stats config and the float64 Cholesky `CovarianceSolver`; with one key the
update equals ROME's rank-one update with `mom2_update_weight` = λ (Sherman–Morrison).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.distributed import gather_objects, gather_rows, share
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.hooks import StopForward, capture, stop_after
from kedit_pl.kv.context import DEFAULT_LENGTHS, template_groups
from kedit_pl.kv.keys import LayerKeys, average_keys, compute_keys, subject_prompts
from kedit_pl.kv.post_norm import mlp_output_targets
from kedit_pl.kv.stats import StatsConfig, second_moment
from kedit_pl.kv.value_cache import cache_folder, cached_values
from kedit_pl.kv.values import KL_PROMPTS, ValueResult, optimize_values
from kedit_pl.methods.rome import ROME, CovarianceSolver
from kedit_pl.models.spec import ModelSpec, linear_weight
from kedit_pl.tokens import pad_id, prompt_ids


def memit_update(keys: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                 mom2_update_weight: float, factors: list | None = None) -> torch.Tensor:
    """ΔW (d_out, d_k) in float64 from MEMIT eq. 14: Δ = R Kᵀ (λC₀ + KKᵀ)⁻¹.

    `keys` (n, d_k) and `resid` (n, d_out) hold one request per row; C = None means C₀ = I. `factors`, if given,
    receives the (left, right) of Δ = left @ right (rank ≤ n).
    """
    left, right = memit_factors(keys, resid, C, mom2_update_weight)
    if factors is not None:
        factors[:] = [left, right]
    return left @ right


def memit_factors(keys: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                  mom2_update_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 14 as a rank-n product Δ = Rᵀ · ((λC₀ + KKᵀ)⁻¹ K)ᵀ: (d_out, n) and (n, d_k), float64."""
    if keys.shape[0] != resid.shape[0]:
        raise ValueError(f"memit_update: {keys.shape[0]} keys but {resid.shape[0]} residuals")
    if not (torch.isfinite(keys).all() and torch.isfinite(resid).all()):
        raise EditFailed("MEMIT update: non-finite keys or residuals (a previous layer's update diverged)")
    dev = C.device if C is not None else keys.device  # where C₀ lives (the model's device unless offloaded)
    K = keys.to(dev, torch.float64).T  # (d_k, n): keys as columns, as in the paper
    C0 = C.double() if C is not None else torch.eye(len(K), dtype=torch.float64, device=dev)
    A = mom2_update_weight * C0 + K @ K.T
    adj = CovarianceSolver(A).solve(K)  # (λC₀ + KKᵀ)⁻¹ K, (d_k, n)
    return resid.to(dev, torch.float64).T, adj.T


@torch.no_grad()
def block_outputs(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, layer: int,
                  requests: list[EditRequest], batch_size: int = 64,
                  also: Sequence[str] = ()) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Output of block `layer` (residual stream) at the subject's last token of each plain prompt, (R, d).
    With `also` (module names at or below that block), their outputs there too, read in the same forward pass:
    returns (block output, *those)."""
    block = spec.module_name("layer", layer)
    names = [block, *also]
    prompts = subject_prompts(tok, requests, ["{}"])
    rows = [prompt_ids(tok, p.text)[: p.subject_idx + 1] for p in prompts]  # causal: the rest is irrelevant
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with capture(model, names) as cap, stop_after(model, block):
        for b0 in range(0, len(rows), batch_size):
            chunk = rows[b0: b0 + batch_size]
            width = max(len(r) for r in chunk)
            ids = torch.full((len(chunk), width), pad_id(tok), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, r in enumerate(chunk):
                ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except StopForward:
                pass
            last = torch.tensor([len(r) - 1 for r in chunk], device=device)
            for n in names:
                out[n].append(cap.outputs[n][torch.arange(len(chunk), device=device), last])
    result = tuple(torch.cat(out[n]) for n in names)
    return result if also else result[0]


#: how k_i averages the keys of the context templates: "groups" = the mean of per-group means (the plain prompt
#: is one group, so it weighs as much as all prefixes together; MEMIT's reference code), "uniform" = the plain
#: mean over every template (the paper's text, ROME eq. 3)
KEY_AVERAGES = ("groups", "uniform")


class MEMIT(ROME):
    """Batch edit of the MLP output projections of `layers` (Hydra: conf/method/memit.yaml).

    Inherits ROME's per-model caches (fingerprint, context templates) and hyperparameters; `self.layer` is the
    top layer L of the range, where the targets z live. Under DDP a batch is shared by the ranks (`compute_targets`).
    """

    can_share_batches = True

    def __init__(self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 spec: ModelSpec | None = None, layers: Sequence[int] | None = None, loss_layer: int | None = None,
                 v_num_grad_steps: int = 25, v_lr: float = 0.5, v_weight_decay: float = 0.5,
                 clamp_norm_factor: float = 0.75, kl_factor: float = 0.0625, stop_loss: float = 5e-2,
                 mom2_adjustment: bool = True, mom2_update_weight: float = 15000.0, z_batch_size: int = 32,
                 context_template_length_params: Sequence[Sequence[int]] = DEFAULT_LENGTHS, context_seed: int = 0,
                 fast: bool = True, stats: StatsConfig | Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, z_cache: bool = True, key_average: str = "groups",
                 compute_dtype: str = "float32", name: str = "memit") -> None:
        if not layers:
            raise ConfigError("MEMIT needs a layer range: set method.layers or model.method_defaults.memit.layers")
        layers = [int(x) for x in layers]
        if sorted(set(layers)) != layers:
            raise ConfigError(f"MEMIT layers must be strictly increasing, got {layers}")
        if spec is not None and not all(0 <= x < spec.n_layers for x in layers):
            raise ConfigError(f"MEMIT layers {layers} out of range 0..{spec.n_layers - 1} for {spec.name}")
        if float(mom2_update_weight) <= 0:
            raise ConfigError(f"MEMIT needs mom2_update_weight > 0 (λ in eq. 14), got {mom2_update_weight}")
        if key_average not in KEY_AVERAGES:
            raise ConfigError(f"MEMIT key_average must be one of {KEY_AVERAGES}, got {key_average!r}")
        if int(z_batch_size) < 1:
            raise ConfigError(f"MEMIT z_batch_size must be >= 1, got {z_batch_size}")
        if loss_layer is not None and spec is not None and not layers[-1] <= int(loss_layer) < spec.n_layers:
            raise ConfigError(f"MEMIT loss_layer {loss_layer} must lie in [{layers[-1]}, {spec.n_layers - 1}]")
        super().__init__(model, tokenizer, spec, layer=layers[-1], loss_layer=loss_layer,
                         v_num_grad_steps=v_num_grad_steps, v_lr=v_lr, v_weight_decay=v_weight_decay,
                         clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor, stop_loss=stop_loss,
                         mom2_adjustment=mom2_adjustment, mom2_update_weight=mom2_update_weight,
                         context_template_length_params=context_template_length_params,
                         context_seed=context_seed, fast=fast, stats=stats, cache_dir=cache_dir,
                         compute_dtype=compute_dtype, name=name)
        self.layers = layers
        self.z_batch_size = int(z_batch_size)
        self.z_cache = bool(z_cache) and self.cache_dir is not None
        self.key_groups = template_groups(self.lengths) if key_average == "groups" else None
        self._mom2: dict[int, torch.Tensor] | None = None
        self._z_seconds: list[float] = []  # z optimization seconds of each rank (shared batches under DDP)

    # --- cached per model ---------------------------------------------------------------------------
    def mom2(self) -> dict[int, torch.Tensor | None]:
        """C₀ = E[kkᵀ] per layer of the range (one corpus pass for all of them); None per layer without stats."""
        if not self.mom2_adjustment:
            return {layer: None for layer in self.layers}
        if self._mom2 is None:
            self._mom2 = second_moment(self.model, self.tok, self.spec, self.layers, self.stats, self.fingerprint)
        return dict(self._mom2)

    def prepare(self) -> None:
        """Templates, C₀ for every layer and the bf16 weight copies, before the first (timed) edit."""
        self.templates()
        self.mom2()
        self.warm_values()

    # --- EditMethod -------------------------------------------------------------------------------
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return [self.spec.weight_name("mlp_out", layer) for layer in self.layers]

    def edit_one(self, req: EditRequest) -> dict[str, Any]:
        """One request is a batch of one (ROME's per-request entry point, kept meaningful)."""
        return self.compute_edit([req])

    def compute_targets(self, requests: list[EditRequest]) -> ValueResult:
        """z_i at the top layer (eq. 16), optimized in groups of `z_batch_size` requests. The z_i are independent, so
        with a batch shared among DDP ranks each rank optimizes whole groups (round-robin; a group is the same as in
        one process, hence the same z) and the z are all-gathered through the strategy: every rank then solves the
        same layer updates (eq. 14) from the same targets."""
        rank, world = self.ranks()
        if world == 1:
            return self._own_targets(requests)
        size = self.z_batch_size
        groups = [list(range(i, min(i + size, len(requests)))) for i in range(0, len(requests), size)]
        mine = [i for g in share(groups, rank, world) for i in g]
        res = self._own_targets([requests[i] for i in mine]) if mine else None
        rows = None if res is None else {"delta": res.delta, "v_init": res.v_init, "nll": res.nll, "kl": res.kl,
                                         "steps": torch.tensor(res.steps, device=res.delta.device)}
        full = gather_rows(self.trainer.strategy, rows, mine, len(requests), next(self.model.parameters()).device)
        costs = gather_objects(self.trainer.strategy, (0.0, 0) if res is None else (res.seconds, res.cached))
        self._z_seconds = [c[0] for c in costs]
        return ValueResult(full["delta"], full["v_init"], full["nll"], full["kl"], full["steps"].tolist(),
                           sum(self._z_seconds), cached=sum(c[1] for c in costs))

    def _own_targets(self, requests: list[EditRequest]) -> ValueResult:
        """z of `requests` computed here (or read from the z cache, which several processes may fill at once)."""
        templates = self.templates()
        max_rows = self.z_batch_size * (len(templates) + len(KL_PROMPTS))

        def compute(reqs: list[EditRequest]) -> ValueResult:
            return optimize_values(self.model, self.tok, self.spec, reqs, templates, self.layer, insert="layer",
                                   loss_layer=self.loss_layer, fast=self.fast, max_rows=max_rows, **self.hp)

        if not self.z_cache:
            return compute(requests)
        settings = {"layer": self.layer, "loss_layer": self.loss_layer, "templates": templates, **self.hp}
        folder = cache_folder(Path(self.cache_dir) / self.spec.name / "memit_z", self.model, settings)
        return cached_values(folder, requests, compute, self.z_batch_size, next(self.model.parameters()).device)

    def _layer_reader(self, requests: list[EditRequest]) -> _LayerReads:
        """What each layer's step reads (keys K, block-L outputs H, the layer's MLP output M): with `fast`, from
        `LayerKeys` (the inputs of the lowest block still to change are kept, so no pass reruns the blocks
        below it), each DDP rank computing its own share of the requests and the rows all-gathered; otherwise
        the plain full passes of `compute_keys` and `block_outputs` (the reference)."""
        return _LayerReads(self, requests)

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        self.check_and_prepare(requests)
        templates, mom2 = self.templates(), self.mom2()
        self._z_seconds = []
        res = self.compute_targets(requests)
        Z = res.target.double()
        info: dict[str, Any] = {"layers": [], "value_seconds": res.seconds, "values_cached": res.cached,
                                "z_steps_mean": sum(res.steps) / len(res.steps),  # Adam steps until stop_loss
                                "z_seconds_per_rank": self._z_seconds,
                                "per_request": [{"case_id": r.case_id, "nll": res.nll[i].item(),
                                                 "steps": res.steps[i], "delta_norm": res.delta[i].norm().item()}
                                                for i, r in enumerate(requests)]}
        seconds = {"keys": 0.0, "outputs": 0.0, "solve": 0.0}  # where the time after the z goes (docs/scale.md)
        reads = self._layer_reader(requests)
        for i, layer in enumerate(self.layers):
            t0 = time.perf_counter()
            K = reads.keys(layer, templates)  # k_i at l, the lower layers already updated (Algorithm 1)
            t1 = time.perf_counter()
            H, M = reads.outputs(layer)  # one pass: z's layer and l's MLP output
            H = H.double()
            t2 = time.perf_counter()
            resid = (Z - H) / (len(self.layers) - i)  # spread the remaining error over the remaining layers
            if self.spec.mlp_post_norm:  # the block adds N(MLP output): target the MLP output through N
                resid = mlp_output_targets(self.spec.module(self.model, "mlp_post_norm", layer), M, resid)
            factors: list[torch.Tensor] = []  # the update's low-rank factors, when the method knows them
            delta_w = self.layer_update(layer, K, resid, mom2[layer], factors)  # eq. 14
            W = linear_weight(self.spec.module(self.model, "mlp_out", layer))
            with torch.no_grad():
                W.add_(delta_w.to(W.device, W.dtype))  # float64 update, written back in the weight's dtype
            if factors:
                self.record_low_rank(self.spec.module_name("mlp_out", layer), *factors)  # for patches
            seconds["keys"] += t1 - t0
            seconds["outputs"] += t2 - t1
            seconds["solve"] += time.perf_counter() - t2
            info["layers"].append({"layer": layer, "z_error": (Z - H).norm(dim=-1).mean().item(),
                                   "update_norm": delta_w.norm().item()})
        t0 = time.perf_counter()
        H = reads.outputs(None).double()
        seconds["outputs"] += time.perf_counter() - t0
        info["final_z_error"] = (Z - H).norm(dim=-1).mean().item()
        info |= {f"{k}_seconds": v for k, v in seconds.items()}
        info.update(self.after_edit(requests))
        return info

    # --- what the MEMIT family (AlphaEdit, EMMET) changes -----------------------------------------------
    def layer_update(self, layer: int, keys: torch.Tensor, resid: torch.Tensor, C: torch.Tensor | None,
                     factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """ΔW (d_out, d_k) at `layer` from the keys (n, d_k) and residuals (n, d_out): MEMIT's eq. 14. A method
        whose ΔW is a known low-rank product appends its (left, right) factors to `factors` (patches store them)."""
        return memit_update(keys, resid, C, self.mom2_update_weight, factors=factors)

    def after_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        """Called once every layer is updated (AlphaEdit accumulates the new keys here); returns diagnostics."""
        return {}


class _LayerReads:
    """MEMIT's per-layer reads (see `MEMIT._layer_reader`). Under DDP each rank reads the row batches a single
    process would make, round-robin, so the gathered keys and outputs are those of one process, bit for bit."""

    def __init__(self, memit: MEMIT, requests: list[EditRequest]) -> None:
        self.m, self.requests = memit, requests
        rank, self.world = memit.ranks()
        self.fast = memit.fast and "{}" in memit.templates()
        self.lk = LayerKeys(memit.model, memit.tok, memit.spec, requests, memit.templates(),
                            part=(rank, self.world)) if self.fast else None
        if self.lk is not None and not self.lk.chunks:
            self.lk = None  # a rank without rows (tiny batch): it only takes part in the gathers

    def _gather(self, rows: dict[str, torch.Tensor] | None, index: Sequence[int], n: int) -> dict[str, torch.Tensor]:
        if self.world == 1:
            return rows
        return gather_rows(self.m.trainer.strategy, rows, index, n, next(self.m.model.parameters()).device)

    def keys(self, layer: int, templates: list[str]) -> torch.Tensor:
        m = self.m
        if not self.fast:
            return compute_keys(m.model, m.tok, m.spec, layer, self.requests, templates, groups=m.key_groups)
        n_req, n_tpl = len(self.requests), len(templates)
        rows = {"k": self.lk.row_keys(layer)} if self.lk else None
        k = self._gather(rows, self.lk.rows if self.lk else [], n_req * n_tpl)["k"]
        return average_keys(k.view(n_req, n_tpl, -1), m.key_groups)

    def outputs(self, layer: int | None) -> Any:
        """(H, M) at `layer` (before its update), or H alone with None (after the last update)."""
        m = self.m
        also = [] if layer is None else [m.spec.module_name("mlp_out", layer)]
        if not self.fast:
            return block_outputs(m.model, m.tok, m.spec, m.layer, self.requests, also=also)
        rows = None
        if self.lk:
            got = self.lk.outputs(m.layer, also)
            rows = dict(zip(("h", "m"), got if also else (got,)))
        full = self._gather(rows, self.lk.plain_requests if self.lk else [], len(self.requests))
        return full["h"] if layer is None else (full["h"], full["m"])
