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


def test_swept_values_become_columns_sorted_by_the_optimized_metric(tmp_path):
    from omegaconf import OmegaConf

    for i, (lr, es) in enumerate([(1e-4, 60.0), (1e-3, 95.0), (1e-2, 80.0)]):
        run = tmp_path / f"{i}_ft_l"
        fake_run(run, "ft_l", es, 2.0)
        (run / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"method": {"name": "ft_l", "lr": lr, "layers": [5]},
                                         "paths": {"output_dir": str(run)}, "optimized_metric": "post/score"}),
                       run / ".hydra" / "config.yaml")
    rows = compare([tmp_path], tmp_path / "cmp")
    assert [r["config"]["method.lr"] for r in rows] == [1e-3, 1e-2, 1e-4]  # best post/score first
    header = (tmp_path / "cmp" / "comparison.md").read_text().splitlines()[0]
    assert "method.lr" in header and "method.layers" not in header and "paths.output_dir" not in header
    by_pre = compare([tmp_path], tmp_path / "c2", sort="pre/es")  # a metric that ties: by model, method, then found
    assert len(by_pre) == 3
    table = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    assert [float(t["method.lr"]) for t in table] == [1e-3, 1e-2, 1e-4]


def test_runs_of_different_methods_show_no_method_internals(tmp_path):
    from omegaconf import OmegaConf

    for i, (method, extra) in enumerate([("ft", {"lr": 1e-3}), ("rome", {"layer": 5})]):
        run = tmp_path / f"{i}_{method}"
        fake_run(run, method, 90.0 + i, 2.0)
        (run / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"method": {"name": method, **extra}, "seed": i}), run / ".hydra" / "config.yaml")
    header = (compare([tmp_path], tmp_path / "cmp") and (tmp_path / "cmp" / "comparison.md").read_text()).splitlines()[0]
    assert "seed" in header and "method.lr" not in header and "method.layer" not in header
