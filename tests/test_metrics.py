"""Metric math against hand-computed values."""
import math

import pytest

from kedit_pl.eval.metrics import magnitude, record_metrics, success_rate, summarize


def s(nll, acc=0.0):
    return {"nll": nll, "acc": acc}


REC_A = {  # rewrite: new more likely; paraphrases: 1 of 2; neighbors: true more likely in 2 of 3
    "case_id": "a",
    "rewrite": {"new": [s(0.5, 1.0)], "true": [s(2.0)]},
    "paraphrase": {"new": [s(1.0, 0.5), s(3.0, 0.0)], "true": [s(2.0), s(1.0)]},
    "neighborhood": {"new": [s(3.0), s(3.0), s(0.1)], "true": [s(1.0, 1.0), s(2.0, 0.0), s(1.0, 1.0)]},
}
REC_B = {  # nothing succeeds
    "case_id": "b",
    "rewrite": {"new": [s(4.0)], "true": [s(1.0)]},
    "paraphrase": {"new": [s(4.0)], "true": [s(1.0)]},
    "neighborhood": {"new": [s(0.5)], "true": [s(1.0)]},
}


def test_success_and_magnitude_by_hand():
    assert success_rate([0.5, 3.0], [2.0, 1.0]) == 0.5
    assert magnitude([0.5], [2.0]) == pytest.approx(math.exp(-0.5) - math.exp(-2.0))


def test_record_metrics_by_hand():
    m = record_metrics(REC_A)
    assert m["es"] == 1.0 and m["ps"] == 0.5 and m["ns"] == pytest.approx(2 / 3)
    assert m["em"] == pytest.approx(math.exp(-0.5) - math.exp(-2.0))
    expected_nm = ((math.exp(-1) - math.exp(-3)) + (math.exp(-2) - math.exp(-3)) + (math.exp(-1) - math.exp(-0.1))) / 3
    assert m["nm"] == pytest.approx(expected_nm)
    assert m["rewrite_acc"] == 1.0 and m["paraphrase_acc"] == 0.25 and m["neighborhood_acc"] == pytest.approx(2 / 3)


def test_summarize_is_mean_over_records_in_percent_with_harmonic_score():
    out = summarize([REC_A, REC_B])
    assert out["es"] == pytest.approx(50.0)
    assert out["ps"] == pytest.approx(25.0)
    assert out["ns"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    hm = 3 / (1 / 50 + 1 / 25 + 1 / out["ns"])
    assert out["score"] == pytest.approx(hm)
    assert out["n_records"] == 2


def test_score_is_zero_when_any_rate_is_zero():
    assert summarize([REC_B])["score"] == 0.0


def test_missing_groups_are_left_out_not_zero():
    rec = {"case_id": "z", "rewrite": {"new": [s(0.1, 1.0)], "true": [s(1.0)]}, "loc": {"ans": [s(1.0, 0.5)]}}
    out = summarize([rec])
    assert "ps" not in out and "ns" not in out and "score" not in out
    assert out["loc_acc"] == 50.0 and out["es"] == 100.0
