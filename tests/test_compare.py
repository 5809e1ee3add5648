"""The compare step: summaries -> markdown/CSV table and a bar chart."""
import csv

from kedit_pl.compare import compare, main
from kedit_pl.io import write_json


def fake_run(path, method, es, seconds):
    write_json(path / "summary.json", {
        "pre": {"es": 20.0, "ps": 25.0, "ns": 75.0, "score": 30.0},
        "post": {"es": es, "ps": 80.0, "ns": 70.0, "score": 3 / (1 / es + 1 / 80 + 1 / 70)},
        "timing": {"n_edits": 10, "seconds_per_edit": seconds},
        "run": {"method": method, "model": "smollm2_135m", "dataset": "counterfact", "mode": "single"}})


def test_compare_writes_table_csv_and_chart(tmp_path, capsys):
    fake_run(tmp_path / "0_ft", "ft", 100.0, 3.0)
    fake_run(tmp_path / "1_ft_l", "ft_l", 90.0, 2.5)
    rows = compare([tmp_path], tmp_path / "cmp")
    assert [r["method"] for r in rows] == ["ft", "ft_l"]
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| ft_l |" in md.replace("| ft_l | smollm2_135m", "| ft_l |") and "100.0" in md
    table = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert float(table[1]["post_es"]) == 90.0 and float(table[0]["s_per_edit"]) == 3.0
    assert (tmp_path / "cmp" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    main([str(tmp_path), "--out", str(tmp_path / "cli")])
    assert "ft_l" in capsys.readouterr().out
