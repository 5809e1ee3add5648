"""bench/memit_scaling.py's bookkeeping: cold per-edit seconds and the resumable CSV/markdown/plot outputs."""
from __future__ import annotations

import importlib.util
import math

from kedit_pl.config import REPO_ROOT

_spec = importlib.util.spec_from_file_location("memit_scaling", REPO_ROOT / "bench" / "memit_scaling.py")
scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scaling)


def bench_row(method, n, edit_s, z_s=float("nan"), z_cached=0):
    return {"method": method, "n_edits": n, "es": 90.0, "ps": 80.0, "ns": 70.0, "score": 79.4,
            "edit_seconds": edit_s, "eval_seconds": 1.0, "peak_rss_mb": 100.0, "z_seconds": z_s,
            "z_cached": z_cached, "z_residual": 0.5}


def test_cold_seconds_price_cached_z_at_the_measured_rate():
    # 100 edits: 40 s of keys and solves, 60 z computed here in 480 s (8 s each), 40 z from the cache
    r = bench_row("memit", 100, edit_s=520.0, z_s=480.0, z_cached=40)
    assert math.isclose(scaling.cold_seconds_per_edit(r), 40 / 100 + 8.0)
    assert scaling.cold_seconds_per_edit(bench_row("memit", 10, 70.0, 60.0)) == 7.0  # nothing cached
    assert math.isnan(scaling.cold_seconds_per_edit(bench_row("memit", 10, 5.0, 0.0, z_cached=10)))
    assert math.isnan(scaling.cold_seconds_per_edit(bench_row("unedited", 10, 0.0)))


def test_outputs_round_trip_for_resume(tmp_path):
    rows = [bench_row("unedited", 10, 0.0), bench_row("memit", 1, 6.0, 5.0), bench_row("memit", 10, 70.0, 60.0),
            bench_row("rome_seq", 10, 100.0)]
    out = tmp_path / "scaling.png"
    paths = scaling.write_outputs(rows, out, "test")
    assert out.read_bytes()[:4] == b"\x89PNG" and all(p.is_file() for p in paths)
    back = scaling.read_rows(out.with_suffix(".csv"))
    assert [(r["method"], r["n_edits"]) for r in back] == [(r["method"], r["n_edits"]) for r in rows]
    assert back[2]["s_per_edit"] == 7.0 and back[3]["s_per_edit"] == 10.0
    md = out.with_suffix(".md").read_text()
    assert "| rome_seq | 10 |" in md and "s_per_edit" in md.splitlines()[2]
