"""Uncertainty of a run's numbers, as pure functions of per-record values (docs/evaluation.md, "Statistics").

- `intervals`: a 95 % percentile bootstrap over records (Efron & Tibshirani 1993, ch. 13): resample the records with
  replacement `resamples` times (a fixed seed), recompute each aggregate (a mean over the records that have the
  metric; Score = the harmonic mean of the resampled ES, PS and NS means), and take the 2.5th and 97.5th percentiles.
- `paired`: two runs on the same records. The same resampled records go into both runs' aggregates, so each
  resample gives a difference A − B; its percentiles are the interval, and the two-sided p-value inverts that
  interval: p = min(1, 2·min(#{Δ* ≤ 0}+1, #{Δ* ≥ 0}+1) / (B+1)), the smallest α whose (1−α) interval excludes 0
  (a paired percentile-bootstrap test; the +1 keeps a p-value from being exactly 0).
- `holm`: Holm's step-down adjustment of m p-values (Holm 1979).
- `leaders`: who is best in a column: the best mean, unless its paired difference to another method does not
  exclude 0 after Holm's adjustment over the comparisons with the best; then those methods tie with it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

#: the defaults of every interval in summary.json, compare and head_to_head
RESAMPLES = 2000
SEED = 0
LEVEL = 0.95
ALPHA = 0.05

PerRecord = Sequence[Mapping[str, float]]


def score_of(es, ps, ns):
    """Score = harmonic mean of ES, PS, NS (0 where one of them is 0), elementwise on arrays (metrics.summarize)."""
    es, ps, ns = (np.asarray(x, dtype=float) for x in (es, ps, ns))
    ok = np.minimum(np.minimum(es, ps), ns) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = 3.0 / (1.0 / es + 1.0 / ps + 1.0 / ns)
    return np.where(ok, h, np.where(np.isnan(es + ps + ns), np.nan, 0.0))


#: aggregates computed from other aggregates: name -> (inputs, function of their resampled means)
DERIVED: dict[str, tuple[tuple[str, ...], Callable]] = {"score": (("es", "ps", "ns"), score_of)}


def resample_indices(n: int, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(resamples, n) record indices drawn with replacement; the same seed gives the same draws."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n), dtype=np.int32)


def columns(per_record: PerRecord) -> dict[str, np.ndarray]:
    """Each metric as an array over the records (NaN where a record has no value)."""
    names = sorted({k for r in per_record for k in r})
    return {k: np.array([float(r[k]) if r.get(k) is not None else np.nan for r in per_record]) for k in names}


def _means(cols: Mapping[str, np.ndarray], idx: np.ndarray | None) -> dict[str, np.ndarray | float]:
    """The aggregate of every column (and the derived ones), per resample when `idx` is given."""
    out: dict[str, np.ndarray | float] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN resample of a sparse metric
        for k, v in cols.items():
            out[k] = np.nanmean(v[idx], axis=1) if idx is not None else float(np.nanmean(v))
    for name, (inputs, fn) in DERIVED.items():
        if all(i in out for i in inputs):
            out[name] = fn(*(out[i] for i in inputs))
    return out


def _percentiles(samples: np.ndarray, level: float) -> list[float]:
    lo, hi = np.nanpercentile(samples, [50 * (1 - level), 50 * (1 + level)])
    return [float(lo), float(hi)]


def intervals(per_record: PerRecord, resamples: int = RESAMPLES, seed: int = SEED,
              level: float = LEVEL) -> dict[str, list[float]]:
    """{metric: [lo, hi]}: the percentile-bootstrap interval of each aggregate over the records (and of Score)."""
    per_record = list(per_record)
    if not per_record:
        return {}
    cols = columns(per_record)
    boot = _means(cols, resample_indices(len(per_record), resamples, seed))
    return {k: _percentiles(np.atleast_1d(v), level) for k, v in boot.items()
            if not np.all(np.isnan(np.atleast_1d(v)))}


@dataclass(frozen=True)
class Paired:
    """A − B on the records both runs scored: the difference of the aggregates, its interval, its p-value."""
    diff: float
    lo: float
    hi: float
    p: float
    n: int

    def excludes_zero(self) -> bool:
        """True when the interval of the difference lies wholly on one side of 0."""
        return self.lo > 0 or self.hi < 0


def paired(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]], resamples: int = RESAMPLES,
           seed: int = SEED, level: float = LEVEL) -> dict[str, Paired]:
    """Per metric, the paired bootstrap of run A against run B; `a` and `b` map case_id -> that record's values.
    A metric counts the records where both runs have it."""
    ids = [i for i in a if i in b]
    if not ids:
        return {}
    ca, cb = columns([a[i] for i in ids]), columns([b[i] for i in ids])
    shared = [k for k in ca if k in cb]
    for k in shared:  # pair: a record counts for a metric only where both runs have it
        both = ~np.isnan(ca[k]) & ~np.isnan(cb[k])
        ca[k], cb[k] = np.where(both, ca[k], np.nan), np.where(both, cb[k], np.nan)
    ca, cb = {k: ca[k] for k in shared}, {k: cb[k] for k in shared}
    idx = resample_indices(len(ids), resamples, seed)
    point_a, point_b = _means(ca, None), _means(cb, None)
    boot_a, boot_b = _means(ca, idx), _means(cb, idx)
    out = {}
    for k in boot_a:
        d = np.asarray(boot_a[k]) - np.asarray(boot_b[k])
        d = d[~np.isnan(d)]
        if not d.size:
            continue
        below, above = int(np.sum(d <= 0)), int(np.sum(d >= 0))
        p = min(1.0, 2.0 * min(below + 1, above + 1) / (d.size + 1))
        n = int(np.sum(~np.isnan(ca[k]))) if k in ca else len(ids)
        out[k] = Paired(float(point_a[k] - point_b[k]), *_percentiles(d, level), p, n)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order: the i-th smallest times (m − i + 1), made monotone, at most 1."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def leaders(means: Mapping[str, float], tests: Mapping[str, Paired], higher_is_better: bool = True,
            alpha: float = ALPHA) -> tuple[str, list[str], dict[str, float]]:
    """(best, tied, adjusted p): `best` has the best mean; `tests[m]` is best − m for each other method m (paired);
    `tied` are the methods whose Holm-adjusted p against the best is ≥ alpha (no evidence that the best is better).
    With `tied` empty the best is best; otherwise best and tied share the lead."""
    best = (max if higher_is_better else min)(means, key=lambda m: means[m])
    others = [m for m in means if m != best and m in tests]
    adj = dict(zip(others, holm([tests[m].p for m in others])))
    untested = [m for m in means if m != best and m not in tests]  # no paired records: cannot be ruled out
    return best, [m for m in others if adj[m] >= alpha] + untested, adj
