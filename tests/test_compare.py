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


def test_a_default_read_through_an_interpolation_equals_the_same_value_set_by_hand(tmp_path):
    """.hydra/config.yaml keeps `${oc.select:...}` unresolved; the run's resolved value (summary.json) is what
    compares, so only the knob that really differs becomes a column."""
    from omegaconf import OmegaConf

    from kedit_pl.io import read_json

    for i, (clamp, lr) in enumerate([("${oc.select:model.method_defaults.rome.clamp_norm_factor,4.0}", 0.5),
                                     (4.0, 0.1)]):
        run = tmp_path / f"{i}_rome"
        fake_run(run, "rome", 90.0 + i, 2.0)
        summary = read_json(run / "summary.json")
        summary["run"]["config"] = {"name": "rome", "clamp_norm_factor": 4.0, "v_lr": lr}
        write_json(run / "summary.json", summary)
        (run / ".hydra").mkdir()
        OmegaConf.save(OmegaConf.create({"method": {"name": "rome", "clamp_norm_factor": clamp, "v_lr": lr}}),
                       run / ".hydra" / "config.yaml")
    header = (compare([tmp_path], tmp_path / "cmp") and (tmp_path / "cmp" / "comparison.md").read_text()).splitlines()[0]
    assert "method.v_lr" in header and "clamp_norm_factor" not in header


def _rec(new_wins: list[bool], ns_keeps: list[bool]) -> dict:
    """A record line's scores: rewrite/paraphrase prompts where P(new) > P(true) iff new_wins, neighbors keep iff."""
    good, bad = {"nll": 1.0, "acc": 1}, {"nll": 3.0, "acc": 0}
    return {"rewrite": {"new": [good if new_wins[0] else bad], "true": [bad if new_wins[0] else good]},
            "paraphrase": {"new": [good if w else bad for w in new_wins], "true": [bad if w else good for w in new_wins]},
            "neighborhood": {"true": [good if k else bad for k in ns_keeps], "new": [bad if k else good for k in ns_keeps]}}


def scored_run(path, method, es_rate: float, n: int = 200, digest: str = "d" * 64):
    """A finished run with records.jsonl (n records; ES true on the first es_rate·n; NS 70 % on every run alike)
    and the summary.json the callback would write from it."""
    import json

    from kedit_pl.eval.intervals import intervals
    from kedit_pl.eval.metrics import summarize
    from kedit_pl.eval.record_values import values_by_state

    lines = [{"case_id": str(i), "pre": _rec([False, False], [i % 10 < 7]),
              "post": _rec([i < es_rate * n, i < es_rate * n], [i % 10 < 7])} for i in range(n)]
    path.mkdir(parents=True)
    (path / "records.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    write_json(path / "summary.json", {
        "pre": summarize(d["pre"] for d in lines), "post": summarize(d["post"] for d in lines),
        "ci": {st: intervals(v) for st, v in values_by_state(lines).items()},
        "timing": {"n_edits": n, "seconds_per_edit": 1.0},
        "run": {"method": method, "model": "m", "dataset": "counterfact", "mode": "single", "split": "test",
                "records_sha256": digest}})


def test_table_shows_intervals_and_marks_a_best_only_where_the_difference_is_significant(tmp_path):
    scored_run(tmp_path / "a", "rome", 1.0)
    scored_run(tmp_path / "b", "memit", 0.8)
    scored_run(tmp_path / "c", "ft", 0.79)
    rows = compare([tmp_path], tmp_path / "cmp", sort="post/score")  # rome first: the reference of the Δ table
    by = {r["method"]: r for r in rows}
    assert by["rome"]["marks"]["post_es"] == "best" and "post_es" not in by["memit"]["marks"]
    # NS is the same on every run: a three-way tie, shown as one
    assert all(r["marks"]["post_ns"] == "tie" for r in rows)
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "**100.0 [100.0, 100.0]**" in md and "70.0 [" in md and "≈" in md and "Holm" in md
    assert "Paired differences" in md and "| memit · m · " in md
    assert "-20.0 [" in md.split("| memit · m · ")[1].splitlines()[0]  # memit − rome on ES
    table = list(csv.DictReader((tmp_path / "cmp" / "comparison.csv").open()))
    memit = next(t for t in table if t["method"] == "memit")
    assert float(memit["post_es_lo"]) < 80.0 < float(memit["post_es_hi"])


def test_two_close_runs_tie(tmp_path):
    scored_run(tmp_path / "a", "memit", 0.8)
    scored_run(tmp_path / "b", "ft", 0.79)
    rows = compare([tmp_path], tmp_path / "cmp")
    assert [r["marks"].get("post_es") for r in rows] == ["tie", "tie"]


def test_runs_on_different_records_are_not_ranked_without_the_flag(tmp_path, capsys):
    import pytest

    from kedit_pl.errors import DifferentRecords

    scored_run(tmp_path / "a", "rome", 1.0, digest="a" * 64)
    scored_run(tmp_path / "b", "memit", 0.8, digest="b" * 64)
    with pytest.raises(DifferentRecords, match="different records"):
        compare([tmp_path], tmp_path / "cmp")
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--out", str(tmp_path / "cli")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--allow-different-records" in err[0]
    assert len(compare([tmp_path], tmp_path / "cmp", allow_different_records=True)) == 2


def _seeded_editor_run(tmp_path, seed: int, es: float, lr: float = 1e-5):
    """An edit run whose `method.checkpoint` names the editor of a training run trained with `seed`."""
    from omegaconf import OmegaConf

    train = tmp_path / f"train_lr{lr}_s{seed}"
    (train / "editor").mkdir(parents=True)
    write_json(train / "train_summary.json", {"seed": seed})
    run = tmp_path / "edits" / f"lr{lr}_s{seed}"
    fake_run(run, "mend", es, 0.2)
    (run / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create({"method": {"name": "mend", "checkpoint": str(train / "editor"), "lr": lr}}),
                   run / ".hydra" / "config.yaml")


def test_seeds_give_mean_and_sample_sd_per_recipe(tmp_path, capsys):
    for seed, es in enumerate([90.0, 94.0, 98.0]):
        _seeded_editor_run(tmp_path, seed, es)
    _seeded_editor_run(tmp_path, 0, 50.0, lr=1e-4)  # another recipe: its own group of one seed
    compare([tmp_path / "edits"], tmp_path / "cmp", seeds=True)
    text = (tmp_path / "cmp" / "seeds.md").read_text()
    assert "3 training seed(s) (0, 1, 2)" in text and "1 training seed(s) (0)" in text
    assert "**94.0 ± 4.0**" in text          # es: mean 94, sample sd 4 over 90 / 94 / 98
    assert "**80.0 ± 0.0**" in text          # ps: the same in every seed
    main([str(tmp_path / "edits"), "--out", str(tmp_path / "cli"), "--seeds"])
    assert "mean ± sd" in capsys.readouterr().out


def test_seeds_without_a_seeded_editor_is_a_one_line_error(tmp_path, capsys):
    import pytest

    fake_run(tmp_path / "ft", "ft", 90.0, 1.0)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), "--seeds"])
    assert e.value.code == 2
    assert "compare --seeds: no run names an editor" in capsys.readouterr().err
