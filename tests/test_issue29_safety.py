"""Issue 29: never lose a user's files, never mix two runs. One test per probe; each failed on the code before it."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from kedit_pl import Editor
from kedit_pl.data.datamodule import select
from kedit_pl.data.readers import read_requests
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, InvalidRecord
from kedit_pl.patch import PatchError, apply_patch, load_patch, main as patch_cli
from kedit_pl.pipeline import cli, run_edit
from tests.conftest import DATA_DIR, edit_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

FT = ("method=ft", "method.steps=1")
FAST_ROME = ["method.v_num_grad_steps=3", "method.mom2_adjustment=false"]
FACT = dict(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
            target_true="French")
CF = DATA_DIR / "counterfact" / "derived" / "counterfact_rome_format_union.json"


def _lines(folder: Path) -> list[str]:
    return (folder / "records.jsonl").read_text().splitlines()


def _user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "notes.txt").write_text("notes")
    (path / "sub" / "data.csv").write_text("1,2")
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err, err
    return err


@pytest.fixture(scope="module")
def rome_patch(tmp_path_factory) -> Path:
    ed = Editor(method="rome", model="tiny_llama", overrides=FAST_ROME)
    return ed.edit(**FACT).save(tmp_path_factory.mktemp("patch") / "00000_darrieux")


# --- loses data -------------------------------------------------------------------------------------------------
def test_patch_apply_out_refuses_a_folder_holding_user_files(rome_patch, tmp_path, capsys):
    keep = _user_folder(tmp_path / "keep")
    assert patch_cli(["apply", str(rome_patch), "--model", "tiny_llama", "--out", str(keep)]) == 2
    assert "not a model folder written by kedit_pl" in _one_line_error(capsys)
    assert patch_cli(["apply", str(rome_patch), "--model", "tiny_llama", "--out", str(keep), "--replace"]) == 2
    _one_line_error(capsys)
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*")) == ["notes.txt", "sub", "sub/data.csv"]


def test_save_model_writes_new_or_empty_folders_and_replaces_only_its_own(tmp_path):
    from kedit_pl.model_folder import MARKER_FILE

    ed = Editor(method="ft", model="tiny_llama", method__steps=1)
    with pytest.raises(ConfigError, match="Editor.save_model: .* not a model folder written by kedit_pl"):
        ed.save_model(_user_folder(tmp_path / "keep"))
    assert (tmp_path / "keep" / "notes.txt").read_text() == "notes"
    (tmp_path / "empty").mkdir()
    ed.save_model(tmp_path / "empty")
    assert (tmp_path / "empty" / MARKER_FILE).is_file() and (tmp_path / "empty" / "config.json").is_file()
    with pytest.raises(ConfigError, match="already holds a model saved by kedit_pl; pass replace=True"):
        ed.save_model(tmp_path / "empty")
    ed.save_model(tmp_path / "empty", replace=True)  # our own folder: replaced
    (tmp_path / "empty" / "mine.txt").write_text("a file the user added")
    with pytest.raises(ConfigError, match="'mine.txt', which kedit_pl did not write"):
        ed.save_model(tmp_path / "empty", replace=True)
    assert (tmp_path / "empty" / "mine.txt").is_file() and (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ed.save_model(tmp_path / "file")


def test_torn_last_line_is_cut_before_a_resume_appends(tmp_path):
    run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=6"))
    lines = _lines(tmp_path)
    assert len(lines) == 6
    (tmp_path / "records.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])
    (tmp_path / "summary.json").unlink()
    s = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=6", "edit.resume=true"))
    rows = [json.loads(x) for x in _lines(tmp_path)]  # every line parses
    assert len(rows) == 6 and s["timing"]["n_edits"] == 6
    assert [r["case_id"] for r in rows] == [json.loads(x)["case_id"] for x in lines]


# --- mixes two runs ---------------------------------------------------------------------------------------------
def test_overwrite_moves_the_whole_earlier_run_aside(tmp_path, caplog):
    out = tmp_path / "run"
    run_edit(edit_cfg(out, *FT, "dataset.limit=2", "edit.mode=sequential", "edit.save=model",
                      "edit.lifelong.every=0"))
    run_edit(edit_cfg(out / "x", *FT, "dataset.limit=1", "edit.save=patch"))  # (patches made elsewhere)
    (out / "x").rename(out / "old_patches")
    (out / "notes.txt").write_text("the user's notes")
    with caplog.at_level(logging.WARNING):
        s = run_edit(edit_cfg(out, "method=ft_l", "method.steps=1", "dataset.limit=1", "edit.save=patch",
                              "edit.overwrite=true"))
    assert s["run"]["method"] == "ft_l"
    (aside,) = tmp_path.glob("run.replaced-*")
    assert f"moved the earlier run in {out}" in caplog.text and str(aside) in caplog.text
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == \
        ["csv", "metrics.png", "patches", "records.jsonl", "run.json", "summary.json", "timing.jsonl"]
    assert [json.loads(p.read_text())["method"] for p in (out / "patches").glob("*.json")] == ["ft_l"]
    assert [p.name for p in (out / "csv").iterdir()] == ["version_0"]  # the new run's logs only
    assert (aside / "csv" / "version_0" / "metrics.csv").is_file()
    assert json.loads((aside / "run.json").read_text())["method"] == "ft"
    assert (aside / "notes.txt").read_text() == "the user's notes" and (aside / "model" / "config.json").is_file()
    assert (aside / "old_patches").is_dir()


def test_head_to_head_reruns_nothing_of_other_settings(tmp_path, monkeypatch):
    from kedit_pl.head_to_head import run_head_to_head

    args = ["model=tiny_llama", "logger=csv", "dataset.limit=2", f"head_to_head.out_dir={tmp_path}",
            "head_to_head.methods=[ft]", "eval.samples.k=0", "eval.metrics=[es_ps_ns]", "method.steps=1"]
    assert run_head_to_head(args)["methods"]["ft"]["status"] == "ran"
    stamp = (tmp_path / "ft" / "summary.json").stat().st_mtime_ns
    for other, diff in ((["seed=1"], "seed: 0 in the folder, 1 now"),
                        (["method.lr=0.5"], "method_config.lr"),
                        (["dataset.limit=1"], "dataset.limit: 2 in the folder, 1 now")):
        with pytest.raises(ConfigError, match=f"head_to_head.out_dir: .*ft holds a run with other settings \\({diff}"):
            run_head_to_head([*args, *other])
    assert (tmp_path / "ft" / "summary.json").stat().st_mtime_ns == stamp
    more = run_head_to_head([*args, "dataset.limit=3"])  # a raised limit extends the run instead
    assert more["methods"]["ft"]["status"] == "ran"
    assert len(_lines(tmp_path / "ft")) == 3
    assert run_head_to_head([*args, "dataset.limit=3"])["methods"]["ft"]["status"] == "complete (earlier)"


def test_hand_edited_patch_is_refused(rome_patch, tmp_path):
    meta = json.loads(rome_patch.read_text())
    assert meta["format"] == 2 and meta["dtypes"] and meta["digests"]["meta"]
    stem = tmp_path / "edited"
    stem.with_suffix(".safetensors").write_bytes(rome_patch.with_suffix(".safetensors").read_bytes())
    meta["requests"][0]["target_new"] = "German"
    stem.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(PatchError, match="its JSON was changed after the patch was made") as e:
        load_patch(stem)
    assert "\n" not in str(e.value)
    old = dict(json.loads(rome_patch.read_text()), format=1)
    stem.with_suffix(".json").write_text(json.dumps(old))
    with pytest.raises(PatchError, match="patch format 1, written by an older kedit_pl"):
        load_patch(stem)


def test_patch_on_weights_of_another_dtype_is_refused(rome_patch):
    ed = Editor(method="rome", model="tiny_llama", overrides=FAST_ROME)
    ed.model.to(torch.bfloat16)
    before = ed.digest()
    with pytest.raises(PatchError, match="made on float32 weights and .* is bfloat16 here; load the model in float32"):
        apply_patch(ed.model, load_patch(rome_patch))
    assert ed.digest() == before


def test_range_past_the_end_says_how_many_records_exist(caplog):
    reqs = [EditRequest(case_id=str(i), subject="S", prompt="{} is", target_true="a", target_new="b") for i in range(10)]
    with caplog.at_level(logging.WARNING):
        chosen = select(reqs, range_="8:20")
    assert [r.case_id for r in chosen] == ["8", "9"]
    assert "asks for 12 records but the file holds 10" in caplog.text and "only 2 of them exist" in caplog.text
    with pytest.raises(ConfigError, match="none of the 5 asked records exist"):
        select(reqs, range_="10:15")


def test_record_without_neighborhood_prompts_is_invalid_and_each_metric_has_its_n(tmp_path):
    from kedit_pl.eval.metrics import metric_counts

    rows = json.loads(CF.read_text())[:3]
    del rows[1]["neighborhood_prompts"]
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    (_, err) = read_requests("counterfact", data)[1]
    assert isinstance(err, InvalidRecord) and "'neighborhood_prompts' is missing" in str(err)
    s = run_edit(edit_cfg(tmp_path / "run", *FT, f"dataset.path={data}", "dataset.on_invalid=skip"))
    assert s["post"]["n_records"] == 2 and s["run"]["skipped"][0]["case_id"] == str(rows[1]["case_id"])
    assert s["n_per_metric"]["ns"] == 2 and s["n_per_metric"]["score"] == 2
    # a format where a record may lack a probe (EasyEdit's: no locality prompt) counts it per metric
    recs = [{"rewrite": {"new": [{"nll": 1.0, "acc": 1}], "true": [{"nll": 2.0, "acc": 0}]},
             "neighborhood": {"new": [{"nll": 2.0, "acc": 0}], "true": [{"nll": 1.0, "acc": 1}]}},
            {"rewrite": {"new": [{"nll": 1.0, "acc": 1}], "true": [{"nll": 2.0, "acc": 0}]}}]
    counts = metric_counts(recs)
    assert counts["es"] == 2 and counts["ns"] == 1


def test_prompt_longer_than_the_context_is_named_before_editing(tmp_path, capsys):
    rows = json.loads(CF.read_text())[:2]
    rows[1]["neighborhood_prompts"][0] = "word " * 100 + rows[1]["neighborhood_prompts"][0]
    data = tmp_path / "long.json"
    data.write_text(json.dumps(rows))
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:  # tiny_gpt2 has 256 positions: this crashed with an IndexError
        cli(run_edit, edit_cfg(out, *FT, "model=tiny_gpt2", f"dataset.path={data}", "edit.skip_invalid=false"))
    err = _one_line_error(capsys)
    assert e.value.code == 2 and f"case_id={rows[1]['case_id']}" in err and "'neighborhood'" in err
    assert "256 positions" in err and not out.exists()
    s = run_edit(edit_cfg(out, *FT, "model=tiny_gpt2", f"dataset.path={data}"))  # skip_invalid (default): skipped
    assert s["timing"]["n_edits"] == 1 and "256 positions" in s["run"]["skipped"][0]["reason"]
    ed = Editor(method="ft", model="tiny_gpt2", method__steps=1)
    with pytest.raises(InvalidRecord, match="positions"):
        ed.edit(**FACT, paraphrases=["word " * 100 + "x"])


def test_single_mode_resume_keeps_the_batch_ordinal(tmp_path):
    run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2"))
    (tmp_path / "summary.json").unlink()
    run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=4", "edit.resume=true"))
    assert [json.loads(x)["batch"] for x in _lines(tmp_path)] == [0, 1, 2, 3]
    steps = []
    for f in sorted((tmp_path / "csv").glob("version_*/metrics.csv")):  # one version per invocation
        rows = f.read_text().splitlines()
        header = rows[0].split(",")
        steps += [int(r.split(",")[header.index("step")]) for r in rows[1:] if r.split(",")[header.index("edit/es")]]
    assert steps == [1, 2, 3, 4]  # edit/* at step batch + 1, never twice at one step


def test_a_resumed_run_reports_the_time_of_every_invocation(tmp_path):
    """summary.json's seconds by phase add the interrupted invocation's (as of its last written records) to the
    resumed one's: the head to head's breakdown of a resumed method is whole."""
    first = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2"))["timing"]["seconds_by_phase"]
    (tmp_path / "summary.json").unlink()
    second = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=4", "edit.resume=true"))["timing"]["seconds_by_phase"]
    clocks = [json.loads(x) for x in (tmp_path / "timing.jsonl").read_text().splitlines()]
    own = [c["clock"] for c in clocks if c["invocation"] == clocks[-1]["invocation"]][-1]
    assert len({c["invocation"] for c in clocks}) == 2
    assert second["post"]["es_ps_ns"] == pytest.approx(first["post"]["es_ps_ns"] + own["post"]["es_ps_ns"], abs=0.02)


def test_failed_run_removes_what_it_made_and_keeps_the_users_files(tmp_path, capsys):
    """A run that fails before any result leaves nothing behind, but never deletes a folder's other files (it did:
    `hydra.run.dir=keep dataset.limit=0` removed keep/ with everything in it)."""
    keep = _user_folder(tmp_path / "keep")
    (keep / ".hydra").mkdir()  # what Hydra writes before the job starts
    for bad in ("dataset.limit=0", "method.lr=-1", "dataset.path=/no/such.json"):  # before and inside RunFolder
        with pytest.raises(SystemExit):
            cli(run_edit, edit_cfg(keep, *FT, bad))
        _one_line_error(capsys)
    assert sorted(str(p.relative_to(keep)) for p in keep.rglob("*")) == ["notes.txt", "sub", "sub/data.csv"]
