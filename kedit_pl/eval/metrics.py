"""Editing metrics as pure functions of per-prompt target NLLs and accuracies (ROME/MEMIT definitions).

P(x) below is the mean-token probability exp(-mean NLL) of a target, the quantity ROME/MEMIT compare.
- ES / PS  (efficacy / paraphrase success): share of prompts with P(new) > P(true)
- NS       (neighborhood success):          share of prompts with P(true) > P(new)
- EM / PM  (magnitudes): mean of P(new) - P(true);   NM: mean of P(true) - P(new) on neighbors
- Score: harmonic mean of ES, PS, NS
- *_acc: teacher-forced top-1 token accuracy (rewrite/paraphrase on target_new, neighborhood on
  target_true, loc on zsRE's loc_ans) -- the zsRE efficacy / generalization / specificity of MEND/MEMIT.
Every rate is a mean over records of the per-record mean over its prompts, reported in percent.
"""
from __future__ import annotations

import math
from statistics import harmonic_mean, mean
from typing import Iterable

SUCCESS = {"es": ("rewrite", "new"), "ps": ("paraphrase", "new"), "ns": ("neighborhood", "true")}
MAGNITUDE = {"em": ("rewrite", "new"), "pm": ("paraphrase", "new"), "nm": ("neighborhood", "true")}
ACCURACY = {"rewrite_acc": ("rewrite", "new"), "paraphrase_acc": ("paraphrase", "new"),
            "neighborhood_acc": ("neighborhood", "true"), "loc_acc": ("loc", "ans")}


def _other(kind: str) -> str:
    return "true" if kind == "new" else "new"


def success_rate(nll_wanted: list[float], nll_other: list[float]) -> float:
    """Share of prompts where the wanted target is more likely (lower mean NLL) than the other."""
    return mean(float(a < b) for a, b in zip(nll_wanted, nll_other))


def magnitude(nll_wanted: list[float], nll_other: list[float]) -> float:
    """Mean of P(wanted) - P(other) with P = exp(-mean NLL)."""
    return mean(math.exp(-a) - math.exp(-b) for a, b in zip(nll_wanted, nll_other))


def record_metrics(rec: dict) -> dict[str, float]:
    """Metrics of one record (fractions in [0, 1] / [-1, 1]); groups a record lacks are left out."""
    out: dict[str, float] = {}
    for table, fn in ((SUCCESS, success_rate), (MAGNITUDE, magnitude)):
        for name, (group, kind) in table.items():
            g = rec.get(group)
            if g and g.get(kind) and g.get(_other(kind)):
                out[name] = fn([s["nll"] for s in g[kind]], [s["nll"] for s in g[_other(kind)]])
    for name, (group, kind) in ACCURACY.items():
        g = rec.get(group)
        if g and g.get(kind):
            out[name] = mean(s["acc"] for s in g[kind])
    return out


def record_percent(rec: dict) -> dict[str, float]:
    """One record's metrics on the report's scale (percent): `summarize` averages these (the bootstrap resamples them)."""
    return {k: 100.0 * v for k, v in record_metrics(rec).items()}


def summarize(records: Iterable[dict]) -> dict[str, float]:
    """Dataset-level metrics in percent: the mean over records of each record metric, plus Score."""
    per = [record_metrics(r) for r in records]
    names = sorted({k for m in per for k in m})
    out = {k: 100.0 * mean(m[k] for m in per if k in m) for k in names}
    if all(k in out for k in ("es", "ps", "ns")):
        out["score"] = harmonic_mean([out["es"], out["ps"], out["ns"]]) if min(out["es"], out["ps"], out["ns"]) > 0 else 0.0
    out["n_records"] = float(len(per))
    return out


def metric_counts(records: Iterable[dict]) -> dict[str, int]:
    """How many records each metric of `summarize` is the mean over (a record without neighborhood prompts has no
    NS); Score's n counts the records that have ES, PS and NS all three."""
    per = [record_metrics(r) for r in records]
    out = {k: sum(k in m for m in per) for k in sorted({k for m in per for k in m})}
    if all(k in out for k in ("es", "ps", "ns")):
        out["score"] = sum(all(k in m for k in ("es", "ps", "ns")) for m in per)
    return out
