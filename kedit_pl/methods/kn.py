"""KN: updating a fact through its knowledge neurons' value slots (Dai et al., ACL 2022, §5.1).

For each knowledge neuron i at layer l of the fact <s, r, o> (refined over the fact's bag of prompts, after
dropping the neurons shared by more than 10 % of the relation's facts, as the reference code does), its value
slot v_i = column i of the MLP output projection becomes
    v_i ← v_i − λ₁ · e(o) + λ₂ · e(o′),   λ₁ = ‖v_i‖/‖e(o)‖ · lambda_true,  λ₂ = ‖v_i‖/‖e(o′)‖ · lambda_new
with e the output (unembedding) vectors (the input embeddings for tied models). Multi-token targets: e is the
unembedding of the target's FIRST token (`target_embedding: first`, the token the neurons were located for and
the only one predicted at the last prompt position), or the mean of its tokens' unembeddings (`mean`).

The relation's facts come from `pool_path` (the first `pool_limit` records, the edited dataset by default);
their neurons are attributed on demand and cached on disk (`kedit_pl/locate/knowledge_neurons.py`).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.locate.knowledge_neurons import FactNeurons, Neuron, NeuronAttributor, NeuronLocator, shared_neurons
from kedit_pl.methods.base import EditMethod
from kedit_pl.models.spec import linear_weight
from kedit_pl.tokens import target_ids

log = logging.getLogger(__name__)

EMBEDDING_RULES = ("first", "mean")


class KnowledgeNeuronsEdit(EditMethod):
    """Edit value slots of a fact's knowledge neurons: subtract the old object, add the new one."""

    def __init__(self, model=None, tokenizer=None, spec=None, *, answer: str = "first_token", steps: int = 20,
                 batch_rows: int = 200,
                 threshold: float = 0.2, p_start: float = 0.7, p_step: float = 0.05, min_neurons: int = 2,
                 max_neurons: int = 5, refine_iters: int = 6, max_prompts: int | None = None,
                 shared_frac: float = 0.1, lambda_true: float = 1.0, lambda_new: float = 8.0,
                 target_embedding: str = "first", pool_path: str | None = None, pool_format: str = "counterfact",
                 pool_limit: int = 200, cache_dir: str | None = None, name: str = "kn") -> None:
        super().__init__(model, tokenizer, spec)
        if target_embedding not in EMBEDDING_RULES:
            raise ConfigError(f"method.target_embedding: {target_embedding!r}; use one of {EMBEDDING_RULES}")
        if not 0 <= shared_frac < 1:
            raise ConfigError(f"method.shared_frac: must be in [0, 1), got {shared_frac}")
        self.lambda_true, self.lambda_new = float(lambda_true), float(lambda_new)
        self.target_embedding = target_embedding
        self.shared_frac = float(shared_frac)
        self.pool_path, self.pool_format, self.pool_limit = pool_path, pool_format, int(pool_limit)
        self._pool: dict[str, list[EditRequest]] | None = None
        self.locator = None
        if model is not None:
            att = NeuronAttributor(model, tokenizer, spec, steps=steps, batch_rows=batch_rows, answer=answer)
            self.locator = NeuronLocator(att, cache_dir, threshold, p_start, p_step, min_neurons, max_neurons,
                                         refine_iters, max_prompts)

    # ---- which neurons ---------------------------------------------------------------------------------
    def pool(self, relation_id: str | None) -> list[EditRequest]:
        """The relation's facts in the pool file (the first `pool_limit` valid records)."""
        if self._pool is None:
            from kedit_pl.data.readers import read_requests

            self._pool = {}
            if self.pool_path:
                valid = [r for r, _ in read_requests(self.pool_format, self.pool_path) if r is not None]
                for r in valid[: self.pool_limit]:
                    self._pool.setdefault(r.relation_id or "", []).append(r)
        return self._pool.get(relation_id or "", [])

    def fact_neurons(self, req: EditRequest) -> tuple[FactNeurons, list[Neuron], list[Neuron]]:
        """The fact's refined neurons, those kept after dropping the relation's shared ones, and the dropped."""
        fact = self.locator.locate(req)
        others = [self.locator.locate(r) for r in self.pool(req.relation_id) if r.case_id != req.case_id]
        group = [fact.neurons] + [o.neurons for o in others]
        shared = shared_neurons(group, self.shared_frac) if others else set()
        kept = [n for n in fact.neurons if n not in shared]
        return fact, kept, [n for n in fact.neurons if n in shared]

    def request_problem(self, req: EditRequest) -> str | None:
        problem = super().request_problem(req)
        if problem:
            return problem
        fact, kept, dropped = self.fact_neurons(req)
        if not fact.neurons:
            return (f"record case_id={req.case_id}: no knowledge neurons after refining (coarse neurons per prompt "
                    f"{fact.coarse_sizes}, p={fact.p})")
        if not kept:
            return (f"record case_id={req.case_id}: all {len(dropped)} knowledge neurons are shared by > "
                    f"{self.shared_frac:.0%} of relation {req.relation_id}'s facts")
        return None

    # ---- the edit --------------------------------------------------------------------------------------
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        layers = sorted({layer for r in requests for layer, _ in self.fact_neurons(r)[1]})
        return [self.spec.weight_name("mlp_out", layer) for layer in layers]

    def embedding(self, target: str) -> torch.Tensor:
        """e(target): the unembedding of its first token, or the mean over its tokens (`target_embedding`)."""
        ids = target_ids(self.tok, target)
        emb = self.model.get_output_embeddings().weight
        return emb[ids[0]] if self.target_embedding == "first" else emb[ids].mean(0)

    @torch.no_grad()
    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        info: dict[str, Any] = {"neurons": {}, "dropped_shared": {}}
        for req in requests:
            fact, kept, dropped = self.fact_neurons(req)
            if not kept:  # request_problem filters these up front; a direct caller gets the same reason
                raise ConfigError(self.request_problem(req) or f"record case_id={req.case_id}: no neurons")
            e_true, e_new = self.embedding(req.target_true), self.embedding(req.target_new)
            for layer, i in kept:
                w = linear_weight(self.spec.module(self.model, "mlp_out", layer))  # (hidden, d_ff) view
                norm = w[:, i].norm()
                lam1 = norm / e_true.norm() * self.lambda_true
                lam2 = norm / e_new.norm() * self.lambda_new
                w[:, i] += (-lam1 * e_true + lam2 * e_new).to(w.dtype)  # §5.1: v_i − λ₁ e(o) + λ₂ e(o′)
            info["neurons"][req.case_id] = [list(n) for n in kept]
            info["dropped_shared"][req.case_id] = len(dropped)
            info["attribution_seconds"] = info.get("attribution_seconds", 0.0) + fact.seconds
        return info
