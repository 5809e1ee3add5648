"""Rows of similar length run together: fewer padded tokens in the value optimization (issue #19 §4).

A MEMIT z batch mixes rows whose suffixes (subject's last token, the rest of the prompt, the target) run from 1
token (the KL rows) to 8, and whose cached prefixes run from 1 to 20 tokens: padded to the longest, about half
of every step's matmul rows are padding. `partition` splits the rows into groups by length, each run as its own
forward, choosing the split that minimizes Σ rows × longest + overhead per group (an extra forward costs Python
and dispatch time, counted in tokens); a batch whose rows are alike (ROME's) stays one group.
"""
from __future__ import annotations

from typing import Sequence


def partition(lengths: Sequence[int], overhead: float) -> list[list[int]]:
    """Indices of `lengths` in groups of contiguous length ranges (each group's indices in increasing order),
    minimizing Σ_groups (rows · max length) + overhead · groups: exact, by dynamic programming over the distinct
    lengths."""
    if not lengths:
        return []
    values = sorted(set(int(x) for x in lengths))
    count = {v: 0 for v in values}
    for x in lengths:
        count[int(x)] += 1
    m = len(values)
    best = [0.0] + [float("inf")] * m  # best[j]: cost of the first j distinct lengths
    cut = [0] * (m + 1)
    for j in range(1, m + 1):
        rows = 0
        for i in range(j, 0, -1):  # last group = distinct lengths i..j
            rows += count[values[i - 1]]
            cost = best[i - 1] + rows * values[j - 1] + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    bounds, j = [], m
    while j > 0:
        bounds.append((values[cut[j]], values[j - 1]))
        j = cut[j]
    return [[k for k, x in enumerate(lengths) if lo <= int(x) <= hi] for lo, hi in reversed(bounds)]
