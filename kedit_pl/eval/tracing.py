"""Fact-tracing metrics (Akyürek et al. 2022) as pure functions of a ranking and the true proponents.

For a query q with ground-truth proponents P and candidates ranked by a method's score:
- RR   = 1 / rank of the first proponent (0 if none is ranked);  MRR = mean over queries
- P@k  = |top-k ∩ P| / k
- R@k  = |top-k ∩ P| / |P|
Reported in percent, as the paper's tables.
"""
from __future__ import annotations

from statistics import mean
from typing import Collection, Iterable, Sequence


def reciprocal_rank(ranked: Sequence, relevant: Collection) -> float:
    """1 / rank of the first relevant item in `ranked` (0 if none is)."""
    for i, x in enumerate(ranked):
        if x in relevant:
            return 1.0 / (i + 1)
    return 0.0


def precision_at(ranked: Sequence, relevant: Collection, k: int) -> float:
    """Share of the top `k` that is relevant."""
    return sum(x in relevant for x in ranked[:k]) / k


def recall_at(ranked: Sequence, relevant: Collection, k: int) -> float:
    """Share of the relevant items found in the top `k` (0 if there are none)."""
    return sum(x in relevant for x in ranked[:k]) / len(relevant) if relevant else 0.0


def query_metrics(ranked: Sequence, relevant: Collection, k: int = 10) -> dict[str, float]:
    """Reciprocal rank, precision@k and recall@k of one query."""
    return {"rr": reciprocal_rank(ranked, relevant), f"p@{k}": precision_at(ranked, relevant, k),
            f"r@{k}": recall_at(ranked, relevant, k)}


def summarize(rows: Iterable[dict[str, float]], k: int = 10) -> dict[str, float]:
    """MRR, P@k, R@k in percent over queries, and their number."""
    rows = list(rows)
    if not rows:
        return {"mrr": float("nan"), f"p@{k}": float("nan"), f"r@{k}": float("nan"), "n_queries": 0}
    return {"mrr": 100 * mean(r["rr"] for r in rows), f"p@{k}": 100 * mean(r[f"p@{k}"] for r in rows),
            f"r@{k}": 100 * mean(r[f"r@{k}"] for r in rows), "n_queries": len(rows)}
