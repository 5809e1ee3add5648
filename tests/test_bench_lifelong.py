"""bench/lifelong.py's bookkeeping: variants, the table row from a run's summary, the report files."""
from __future__ import annotations

import argparse
import importlib.util
import json

import pytest

from kedit_pl.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location("bench_lifelong", REPO_ROOT / "bench" / "lifelong.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def summary(collapsed=None) -> dict:
    rows = [{"n_edits": 0, "perplexity": 20.0, "delta_norm_total": 0.0},
            {"n_edits": 10, "es": 90.0, "ps": 80.0, "ns": 60.0, "perplexity": 25.0, "delta_norm_total": 3.5}]
    return {"final": {"es": 85.0, "ps": 70.0, "ns": 61.0, "score": 70.9}, "post": {"es": 99.0, "ps": 90.0, "ns": 62.0},
            "timing": {"n_edits": 10, "seconds_per_edit": 7.5, "wall_seconds": 120.0}, "run": {"batch_size": 5},
            "lifelong": {"start_perplexity": 20.0, "collapsed": collapsed, "rows": rows}}


def test_variant_parsing():
    assert study.parse_variant("a5=alphaedit:method.nullspace_threshold=5e-3,method.l2=1") == (
        "a5", "alphaedit", ["method.nullspace_threshold=5e-3", "method.l2=1"])
    with pytest.raises(SystemExit, match="METHOD"):
        study.parse_variant("x=nomethod")


def test_table_row_and_report(tmp_path):
    row = study.table_row("alphaedit", summary("collapse after 10 edits"), {"wall_seconds": 130.0})
    assert row["final_es"] == 85.0 and row["post_es"] == 99.0 and row["edits"] == 10 and row["batch"] == 5
    assert row["ppl_start"] == 20.0 and row["ppl_end"] == 25.0 and row["dW"] == 3.5 and row["wall_s"] == 130.0
    assert row["collapsed"] == "collapse after 10 edits"
    (tmp_path / "memit").mkdir()
    (tmp_path / "memit" / "summary.json").write_text(json.dumps(summary()))
    args = type("A", (), {"out": str(tmp_path), "runs": {"memit": ("memit", []), "rome": ("rome", [])},
                          "figure": str(tmp_path / "f.png")})
    text = study.report(args)
    runs, checkpoints = text.split("\n\n")
    assert runs.count("\n") == 2 and "| memit | 5 | 10 | 85.0 |" in runs  # header, rule, the one finished run
    assert "| memit | 10 | 90.0 | 80.0 | 60.0 | 25.00 | 3.50 |" in checkpoints
    assert (tmp_path / "f.png").stat().st_size > 0 and json.loads((tmp_path / "table.json").read_text())[0]["wall_s"] == 120.0


def test_an_interrupted_run_is_resumed_not_restarted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(study.subprocess, "call", lambda cmd, **kw: calls.append(cmd) or 0)
    args = argparse.Namespace(
        out=str(tmp_path), model="tiny_llama", n_edits=4, rome_batch=1, memit_batch=2, rome_every=1, memit_every=1,
        sample=2, set=[], runs={"memit": ("memit", [])})
    assert study.run_method("memit", args)["resumed"] is False and "edit.resume=true" not in calls[-1]
    (tmp_path / "memit").mkdir()
    (tmp_path / "memit" / "records.jsonl").write_text('{"case_id": "0"}\n')  # an interrupted run's first batch
    result = study.run_method("memit", args)
    assert result["resumed"] and calls[-1][-1] == "edit.resume=true"
    assert (tmp_path / "memit" / "records.jsonl").is_file()  # kept, not deleted
    # a resumed run's wall time is its summary's (summed over the runs that made it), not the last process's
    assert study.table_row("memit", summary(), result)["wall_s"] == 120.0


def test_report_names_a_collapsed_run_and_its_collapse_limit(tmp_path, monkeypatch):
    (tmp_path / "rome").mkdir()
    (tmp_path / "rome" / "summary.json").write_text(json.dumps(summary("collapse after 10 edits")))
    (tmp_path / "rome" / "run.json").write_text(json.dumps({"lifelong": {"collapse_factor": 10.0}}))
    drawn = {}
    monkeypatch.setattr(study, "plot_curves", lambda curves, path, limit=None: drawn.update(curves=curves, limit=limit))
    args = type("A", (), {"out": str(tmp_path), "runs": {"rome": ("rome", [])}, "figure": str(tmp_path / "f.png")})
    text = study.report(args)
    assert list(drawn["curves"]) == ["rome (collapsed)"] and drawn["limit"] == 200.0  # 10 × its start perplexity 20
    assert "| rome (collapsed) | 10 | 90.0 |" in text
    assert study.run_collapse_limit(tmp_path / "missing", {"start_perplexity": 20.0}) is None  # no run.json: no line
