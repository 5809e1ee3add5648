"""Bootstrap intervals, paired tests and Holm's correction: pure arithmetic checked on planted data."""
import random

import numpy as np
import pytest

from kedit_pl.eval.intervals import Paired, holm, intervals, leaders, paired, score_of
from kedit_pl.eval.metrics import summarize


def records(rates: dict[str, float], n: int = 200, seed: int = 1) -> list[dict[str, float]]:
    """n records whose per-record success is 0 or 100 with the given probabilities."""
    rng = random.Random(seed)
    return [{k: 100.0 * (rng.random() < p) for k, p in rates.items()} for _ in range(n)]


def test_interval_of_a_constant_metric_is_a_point():
    ci = intervals([{"es": 100.0, "ns": 70.0}] * 50)
    assert ci["es"] == [100.0, 100.0] and ci["ns"] == [70.0, 70.0]


def test_interval_holds_the_mean_and_narrows_with_more_records():
    small, big = records({"es": 0.7}, 50), records({"es": 0.7}, 800)
    for recs in (small, big):
        mean = np.mean([r["es"] for r in recs])
        lo, hi = intervals(recs)["es"]
        assert lo < mean < hi
    width = lambda r: np.diff(intervals(r)["es"])[0]  # noqa: E731
    assert width(big) < width(small) / 2.5  # ~ 1/sqrt(n): sqrt(16) = 4


def test_bootstrap_is_reproducible_with_its_seed():
    recs = records({"es": 0.6, "ps": 0.5, "ns": 0.7})
    assert intervals(recs, seed=3) == intervals(recs, seed=3)
    assert intervals(recs, seed=3) != intervals(recs, seed=4)


def test_score_interval_comes_from_resampled_es_ps_ns_and_missing_values_are_skipped():
    recs = records({"es": 0.9, "ps": 0.8, "ns": 0.6})
    recs[0] = {"es": 100.0}  # a record without PS/NS counts for ES only
    ci = intervals(recs)
    means = {k: np.nanmean([r.get(k, np.nan) for r in recs]) for k in ("es", "ps", "ns")}
    point = float(score_of(means["es"], means["ps"], means["ns"]))
    assert ci["score"][0] < point < ci["score"][1]
    assert score_of(0.0, 50.0, 50.0) == 0.0 and score_of(60.0, 60.0, 60.0) == pytest.approx(60.0)


def test_score_of_matches_summarize():
    out = summarize([{"rewrite": {"new": [{"nll": 1.0, "acc": 1}], "true": [{"nll": 2.0, "acc": 0}]},
                      "paraphrase": {"new": [{"nll": 1.0, "acc": 1}, {"nll": 3.0, "acc": 0}],
                                     "true": [{"nll": 2.0, "acc": 0}] * 2},
                      "neighborhood": {"true": [{"nll": 1.0, "acc": 1}] * 3,
                                       "new": [{"nll": 2.0, "acc": 0}, {"nll": 0.5, "acc": 1}, {"nll": 2.0, "acc": 0}]}}])
    assert float(score_of(out["es"], out["ps"], out["ns"])) == pytest.approx(out["score"])


def test_paired_difference_of_identical_runs_is_zero_with_p_one():
    recs = records({"es": 0.6, "ps": 0.5, "ns": 0.7})
    a = {str(i): r for i, r in enumerate(recs)}
    res = paired(a, dict(a))
    for k in ("es", "ps", "ns", "score"):
        assert res[k] == Paired(0.0, 0.0, 0.0, 1.0, 200)


def test_planted_twenty_point_gap_on_200_records_is_significant():
    base = records({"ns": 0.5}, 200, seed=5)
    worse = [{"ns": r["ns"]} for r in base]
    ones = [i for i, r in enumerate(base) if r["ns"] == 100.0]
    for i in ones[:40]:  # 40 of 200 records lose their neighborhood: a 20-point drop
        worse[i]["ns"] = 0.0
    res = paired({str(i): r for i, r in enumerate(base)}, {str(i): r for i, r in enumerate(worse)})["ns"]
    assert res.diff == pytest.approx(20.0) and res.lo > 10 and res.excludes_zero() and res.p < 0.001
    noise = paired({str(i): r for i, r in enumerate(base)},
                   {str(i): r for i, r in enumerate(records({"ns": 0.5}, 200, seed=6))})["ns"]
    assert noise.p > 0.01 or abs(noise.diff) > 10  # unrelated samples of the same rate: rarely "significant"


def test_paired_uses_only_records_both_runs_have():
    a = {"1": {"es": 100.0}, "2": {"es": 0.0}, "3": {"es": 100.0}}
    b = {"2": {"es": 0.0}, "3": {"es": 0.0}, "4": {"es": 100.0}}
    res = paired(a, b)["es"]
    assert res.n == 2 and res.diff == pytest.approx(50.0)


def test_holm_matches_the_step_down_rule():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []


def test_leaders_mark_a_best_only_when_it_beats_the_runner_up():
    sig, ns = Paired(20.0, 10.0, 30.0, 0.001, 200), Paired(1.0, -2.0, 4.0, 0.4, 200)
    best, tied, _ = leaders({"rome": 90.0, "memit": 70.0, "ft": 60.0}, {"memit": sig, "ft": sig})
    assert best == "rome" and tied == []
    best, tied, adj = leaders({"rome": 90.0, "memit": 89.0, "ft": 60.0}, {"memit": ns, "ft": sig})
    assert best == "rome" and tied == ["memit"] and adj["ft"] == pytest.approx(0.002)
    best, tied, _ = leaders({"a": 3.0, "b": 5.0}, {"b": sig}, higher_is_better=False)
    assert best == "a" and tied == []
