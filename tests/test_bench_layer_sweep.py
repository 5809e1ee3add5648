"""bench/layer_sweep.py: one row per layer, with the 95 % bootstrap intervals of each run in table and figure."""
from __future__ import annotations

import importlib.util

from kedit_pl.config import REPO_ROOT
from kedit_pl.io import write_json

_spec = importlib.util.spec_from_file_location("bench_layer_sweep", REPO_ROOT / "bench" / "layer_sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_rows_carry_intervals_into_the_table_and_figure(tmp_path):
    for i, layer in enumerate((1, 5)):
        post = {"es": 100.0, "ps": 98.0 - i, "ns": 72.0 - 3 * i, "score": 88.0 - i, "n_records": 30.0}
        write_json(tmp_path / f"{i}_rome" / "summary.json", {
            "pre": {"ns": 72.8}, "post": post, "timing": {"seconds_per_edit": 5.0},
            "ci": {"post": {k: [v - 2.0, v + 1.0] for k, v in post.items() if k != "n_records"}},
            "run": {"config": {"layer": layer}}})
    rows = sweep.sweep_rows(tmp_path)
    assert [r["layer"] for r in rows] == [1, 5] and rows[1]["ci"]["ns"] == [67.0, 70.0]
    md, _ = sweep.table(rows, None)
    assert "| 5 | 100.0 [98.0, 101.0] | 97.0 [95.0, 98.0] | 69.0 [67.0, 70.0] |" in md
    sweep.plot(rows, None, tmp_path / "fig.png", "t")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
