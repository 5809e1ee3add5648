"""What the scope classifier is trained and measured on: in-scope and out-of-scope inputs of edit requests.

In scope of edit i: its rewrite prompt and its paraphrases. Out of scope of every edit: its loc input and
neighborhood prompts. Against a memory of several edits, the other edits' inputs are the hard negatives.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch

from kedit_pl.data.requests import EditRequest

IN_SCOPE = ("rewrite", "paraphrase")


@dataclass
class ScopeQueries:
    """Texts to classify against the memory, each with the request whose scope holds it (-1: none) and its kind."""
    texts: list[str] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)  # index of the request whose scope holds the text, -1: none
    kinds: list[str] = field(default_factory=list)   # rewrite | paraphrase | loc | neighborhood

    def add(self, text: str, owner: int, kind: str) -> None:
        """Append one text with its owner and kind."""
        self.texts.append(text), self.owners.append(owner), self.kinds.append(kind)


def scope_queries(requests: list[EditRequest], negatives_per_record: int | None = 4) -> ScopeQueries:
    """Every request's in-scope inputs and up to `negatives_per_record` out-of-scope ones (None: all)."""
    q = ScopeQueries()
    for i, r in enumerate(requests):
        q.add(r.rewrite, i, "rewrite")
        for p in r.paraphrases:
            q.add(p, i, "paraphrase")
        outside = ([("loc", r.loc)] if r.loc else []) + [("neighborhood", n) for n in r.neighborhood if n != r.loc]
        for kind, text in outside[:negatives_per_record]:
            q.add(text, -1, kind)
    return q


class ScopeCounts:
    """Accumulates routing decisions; precision/recall of "in scope of some stored edit" and edit matching."""

    def __init__(self) -> None:
        self.c: Counter = Counter()

    def add(self, probs: torch.Tensor, owners: list[int], kinds: list[str]) -> None:
        """From a (queries x edits) probability matrix: route to the best edit when its p > 0.5."""
        best, idx = probs.max(dim=-1)
        self.add_decisions(best > 0.5, [i == o for i, o in zip(idx.tolist(), owners)], owners, kinds)

    def add_decisions(self, hit: torch.Tensor, right_edit: list[bool], owners: list[int], kinds: list[str]) -> None:
        """Count the classifier's decisions on one batch of queries."""
        for h, right, owner, kind in zip(hit.tolist(), right_edit, owners, kinds):
            inside = owner >= 0
            self.c["tp" if h and inside else "fp" if h else "fn" if inside else "tn"] += 1
            self.c[f"n_{kind}"] += 1
            self.c[f"hit_{kind}"] += int(h)
            self.c["matched"] += int(h and inside and right)

    def metrics(self) -> dict[str, float]:
        """Precision, recall, F1, the right-edit match rate and the hit rate per kind."""
        c = self.c
        n_in = c["tp"] + c["fn"]
        out = {"precision": c["tp"] / max(1, c["tp"] + c["fp"]), "recall": c["tp"] / max(1, n_in),
               "match": c["matched"] / max(1, n_in)}
        p, r = out["precision"], out["recall"]
        out["f1"] = 2 * p * r / (p + r) if p + r else 0.0
        for kind in ("rewrite", "paraphrase", "loc", "neighborhood"):
            if c[f"n_{kind}"]:
                out[f"hit_rate_{kind}"] = c[f"hit_{kind}"] / c[f"n_{kind}"]
        return out

    def raw(self) -> dict[str, float]:
        """Counts and metrics, prefixed `scope_` (for an edit's diagnostics)."""
        return {f"scope_{k}": float(v) for k, v in {**dict(self.c), **self.metrics()}.items()}
