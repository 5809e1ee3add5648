"""TracIn (Pruthi et al. 2020, the checkpoint form TracInCP): the influence of training example z on query z' is

    TracIn(z, z') = Σ_c η_c ∇ℓ(w_c, z) · ∇ℓ(w_c, z')

summed over the saved checkpoints w_c with their learning rates η_c. `normalize: true` is the unit-normalized
variant Akyürek et al. (2022) compare for fact tracing: Σ_c cos(∇ℓ(w_c, z), ∇ℓ(w_c, z')) (each checkpoint's
gradients normalized over all chosen weights together). Gradients are restricted to the chosen weights (default:
the MLP output projections of the layers causal tracing marks plus the last two) and stored as Kronecker-factored
random projections (`grads.py`), so 1,000 queries × 10,000 documents is one matrix product per checkpoint. The
documents' (and queries') vectors are cached on disk per checkpoint; with no checkpoint the unedited model is the
only one.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch

from kedit_pl.locate.influence.base import InfluenceMethod, unit_rows
from kedit_pl.locate.influence.checkpoints import Checkpoint, applied, weight_names
from kedit_pl.locate.influence.corpus import Document, Query
from kedit_pl.locate.influence.grads import GradientCache, GradientFeaturizer


class TracIn(InfluenceMethod):
    """TracIn (Pruthi et al. 2020): Σ over checkpoints of η_c ⟨∇ℓ(query), ∇ℓ(document)⟩, optionally cosine,
    over projected per-example gradients of the chosen modules."""
    name = "tracin"

    def __init__(self, model=None, checkpoints: Sequence[Checkpoint] = (), cache_dir: str | Path | None = None,
                 normalize: bool = False, layers: Sequence[int] | None = None, modules: Sequence[str] = ("mlp_out",),
                 projection: str = "kronecker", proj_in: int = 32, proj_out: int = 32, seed: int = 0,
                 batch_size: int = 16, max_tokens: int = 48, cache: bool = True, name: str = "tracin",
                 progress: bool = True, **_context: Any) -> None:
        if model is None:
            raise ValueError("TracIn needs the loaded model (model=LoadedModel)")
        self.loaded, self.checkpoints = model, list(checkpoints) or [None]
        self.normalize, self.name, self.progress = bool(normalize), name, progress
        names = weight_names(model.spec, layers, list(modules))
        self.featurizer = GradientFeaturizer(model.model, model.tokenizer, names, projection, proj_in, proj_out, seed,
                                             batch_size, max_tokens)
        self.cache_dir = Path(cache_dir) if cache and cache_dir else None
        self._timing: dict[str, Any] = {}
        self._base_digest: str | None = None

    def _weights_key(self, ckpt: Checkpoint | None) -> str:
        from kedit_pl.digests import weights_digest

        if self._base_digest is None:
            self._base_digest = weights_digest(self.loaded.model)
        return f"{self._base_digest}+{ckpt.digest if ckpt else 'none'}"

    def _rank(self, queries: list[Query], corpus: list[Document]) -> torch.Tensor:
        from rich.progress import Progress

        docs = [(d.prompt, d.target) for d in corpus]
        qs = [(q.prompt, q.answer) for q in queries]
        scores = torch.zeros(len(queries), len(corpus))
        t_doc = t_query = 0.0
        n_doc = n_query = 0
        with Progress(transient=False, disable=not self.progress) as bar:
            for c, ckpt in enumerate(self.checkpoints):
                tag = f"checkpoint {c + 1}/{len(self.checkpoints)}"
                task = bar.add_task(f"{self.name}: documents, {tag}", total=len(docs))
                with applied(self.loaded.model, ckpt):
                    cache = GradientCache(self.cache_dir, self._weights_key(ckpt), self.featurizer.settings())
                    g_doc, computed, sec = cache.features(self.featurizer, docs, lambda n: bar.advance(task, n))
                    n_doc, t_doc = n_doc + computed, t_doc + sec
                    task_q = bar.add_task(f"{self.name}: queries, {tag}", total=len(qs))
                    g_q, computed_q, sec_q = cache.features(self.featurizer, qs, lambda n: bar.advance(task_q, n))
                    n_query, t_query = n_query + computed_q, t_query + sec_q
                if self.normalize:  # Σ_c cos(∇ℓ(w_c, z), ∇ℓ(w_c, z'))
                    scores += unit_rows(g_q) @ unit_rows(g_doc).T
                else:  # Σ_c η_c ∇ℓ(w_c, z)·∇ℓ(w_c, z')
                    scores += (ckpt.lr if ckpt else 1.0) * (g_q @ g_doc.T)
        self._timing = {"s_per_document": t_doc / n_doc if n_doc else None, "documents_computed": n_doc,
                        "s_per_query": t_query / n_query if n_query else None, "queries_computed": n_query,
                        "checkpoints": len(self.checkpoints), "gradient_dim": self.featurizer.dim,
                        "note": "seconds per example and checkpoint (one forward + backward); vectors cached on disk"}
        return scores

    def timing(self) -> dict[str, Any]:
        return self._timing
