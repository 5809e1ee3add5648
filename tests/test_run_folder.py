"""Run folders never mix results: one owner (lock), fresh runs refuse used folders, resume checks identity,
records count once, and a finished run has nothing to do (issue #14 §1)."""
import json
import subprocess
import sys
import time

import pytest

from kedit_pl.config import REPO_ROOT
from kedit_pl.errors import ConfigError, RunFolderBusy
from kedit_pl.eval.callback import read_done_records
from kedit_pl.pipeline import cli, run_edit
from kedit_pl.run_folder import RunFolder, first_difference
from tests.conftest import edit_cfg

FT = ("method=ft", "method.steps=2")


def _lines(folder):
    return (folder / "records.jsonl").read_text().splitlines()


def _no_model(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr("kedit_pl.pipeline.build_method", boom)


def test_fresh_run_refuses_a_used_folder_and_resume_checks_identity(tmp_path, monkeypatch):
    hydra_cfg = tmp_path / ".hydra" / "config.yaml"
    hydra_cfg.parent.mkdir()
    hydra_cfg.write_text("the owner's config")  # Hydra writes it before the job starts
    run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2"))
    with monkeypatch.context() as m:
        _no_model(m)  # every refusal below comes before the model loads
        hydra_cfg.write_text("the refused run's config")
        with pytest.raises(ConfigError, match="already holds results.*edit.resume=true.*edit.overwrite=true"):
            run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2"))
        assert hydra_cfg.read_text() == "the owner's config"  # the folder still describes its results
        for args, field in [(["method=ft_l", "dataset.limit=2"], "method: 'ft' in the folder, 'ft_l' now"),
                            ([*FT, "method.lr=0.5", "dataset.limit=2"], "method_config.lr"),
                            ([*FT, "dataset.limit=1"], "dataset.limit: 2 in the folder, 1 now"),
                            ([*FT, "dataset.range=1:5"], "dataset.range"),
                            ([*FT, "model=tiny_gpt2", "dataset.limit=2"], "model: 'tiny_llama' in the folder")]:
            with pytest.raises(ConfigError, match=f"edit.resume: this run differs.*{field}"):
                run_edit(edit_cfg(tmp_path, *args, "edit.resume=true"))
    assert len(_lines(tmp_path)) == 2  # nothing was appended by the refused runs
    s = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2", "edit.overwrite=true"))
    assert len(_lines(tmp_path)) == 2 and s["timing"]["n_edits"] == 2


def test_records_count_once_and_a_finished_run_has_nothing_to_do(tmp_path, monkeypatch):
    run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=2"))
    first = _lines(tmp_path)[0]
    with open(tmp_path / "records.jsonl", "a") as f:  # a duplicate line, as the old append-on-rerun left
        f.write(first + "\n")
    assert [d["case_id"] for d in read_done_records(tmp_path)] == [json.loads(x)["case_id"] for x in _lines(tmp_path)[:2]]
    s = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=3", "edit.resume=true"))  # raising the limit extends
    assert s["timing"]["n_edits"] == 3 and s["post"]["n_records"] == 3 and s["run"]["n_records"] == 3
    _no_model(monkeypatch)
    again = run_edit(edit_cfg(tmp_path, *FT, "dataset.limit=3", "edit.resume=true"))
    assert again == json.loads((tmp_path / "summary.json").read_text())


def test_a_folder_held_by_another_live_process_fails_fast_and_is_left_alone(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from kedit_pl.run_folder import RunFolder\n"
        f"with RunFolder({str(out)!r}, {{'method': 'x'}}):\n    print('held', flush=True); time.sleep(60)")],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (out / "records.jsonl").write_text("")  # the other run's files
        t0 = time.perf_counter()
        with pytest.raises(SystemExit) as e:
            cli(run_edit, edit_cfg(out, *FT))
        assert e.value.code == 2 and time.perf_counter() - t0 < 30
        assert out.is_dir() and (out / ".kedit.lock").is_file()  # the holder's folder is not cleaned up
        with pytest.raises(RunFolderBusy, match=f"{out} is being written by another running process \\(pid {holder.pid}\\)"):
            RunFolder(out, {}).__enter__()
    finally:
        holder.kill()
        holder.wait()
    with RunFolder(out, {"method": "x"}, overwrite=True):  # a dead holder's lock is gone with it
        pass


def test_first_difference_names_the_leaf():
    assert first_difference({"a": 1, "b": {"c": [1, 2]}}, {"a": 1, "b": {"c": [1, 3]}}) == "b.c: [1, 2] in the folder, [1, 3] now"
    assert first_difference({"a": 1}, {"a": 1, "z": 2}) == "z: '<absent>' in the folder, 2 now"
    assert first_difference({"a": 1}, {"a": 1}) is None
