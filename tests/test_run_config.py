"""Config errors before anything heavy, skipped data records listed, and what a user sees (issue #14 §3, §4)."""
import json

import pytest

from kedit_pl.eval.callback import set_run_summary
from kedit_pl.eval.report import LEGEND, print_table
from kedit_pl.pipeline import cli, run_edit
from tests.conftest import DATA_DIR, edit_cfg

BAD = [("edit.batch_size=0", "edit.batch_size: must be a positive integer, got 0"),
       ("edit.batch_size=-3", "edit.batch_size"),
       ("edit.mode=bogus", "edit.mode: must be one of single, batch, sequential, got 'bogus'"),
       ("dataset.limit=abc", "dataset.limit: must be a positive integer or null, got 'abc'"),
       ("dataset.limit=0", "dataset.limit"),
       ("dataset.range=5", "dataset.range: expected 'START:END'"),
       ("dataset.range=9:3", "dataset.range"),
       ("dataset.ids=7", "dataset.ids"),
       ("dataset.on_invalid=maybe", "dataset.on_invalid"),
       ("edit.eval_batch_size=0", "edit.eval_batch_size"),
       ("edit.resume=yes", "edit.resume: must be true or false"),
       ("edit.overwrite=true edit.resume=true", "pick one")]


@pytest.mark.parametrize("override, message", BAD, ids=[b[0] for b in BAD])
def test_bad_config_is_one_line_before_the_model_and_leaves_nothing(tmp_path, monkeypatch, capsys, override, message):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("kedit_pl.pipeline.build_method", boom)
    monkeypatch.setattr("kedit_pl.data.datamodule.load_split_and_skips", boom)  # nor the data
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)  # what Hydra writes before the job starts
    with pytest.raises(SystemExit) as e:
        cli(run_edit, edit_cfg(out, *override.split()))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and message in err, err
    assert not out.exists()


def test_records_skipped_as_invalid_are_listed_in_the_summary(tmp_path):
    rows = json.loads((DATA_DIR / "counterfact/derived/counterfact_rome_format_union.json").read_text())[:3]
    rows[1]["requested_rewrite"]["target_new"]["str"] = ""
    data = tmp_path / "bad.json"
    data.write_text(json.dumps(rows))
    s = run_edit(edit_cfg(tmp_path / "run", "method=ft", "method.steps=1", f"dataset.path={data}",
                          "dataset.on_invalid=skip"))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["run"]["skipped"] == s["run"]["skipped"]
    (skip,) = s["run"]["skipped"]
    assert skip["case_id"] == str(rows[1]["case_id"]) and skip["reason"].startswith("invalid record:")
    assert s["timing"]["n_edits"] == 2


def test_wandb_style_summary_shows_the_aggregates_not_the_last_record():
    class Run:
        summary = {"edit/ns": 40.0, "edit/es": 100.0}  # what W&B keeps: each key's last logged value

    class Logger:
        experiment = Run()

    lg = Logger()
    set_run_summary([lg, object()], {"post/ns": 72.0, "post/es": 98.0, "pre/ns": 70.0, "timing/seconds_per_edit": 9.0})
    assert lg.experiment.summary == {"edit/ns": 72.0, "edit/es": 98.0, "post/ns": 72.0, "post/es": 98.0,
                                     "pre/ns": 70.0, "timing/seconds_per_edit": 9.0, "edit/seconds_per_edit": 9.0}


def test_table_is_plain_text_off_a_terminal_with_a_legend(capsys):
    summary = {"pre": {"es": 30.0, "em": -2.5}, "post": {"es": 98.0, "em": 41.25},
               "timing": {"n_edits": 2, "seconds_per_edit": 9.1, "peak_rss_mb": 2300},
               "run": {"method": "ft_l", "model": "m", "dataset": "counterfact", "mode": "single"}}
    print_table(summary)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "kedit_pl results  ft_l · m · counterfact · single"
    assert out[1].split() == ["metric", "pre", "post"] and out[3].split() == ["es", "30.0", "98.0"]
    assert out[4].split() == ["em", "-2.5", "41.2"] and out[-1] == LEGEND
    assert not any(ch in "".join(out) for ch in "┃│━─┏")
