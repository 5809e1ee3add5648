"""Resuming an interrupted sequential run (kedit_pl/sequential_state.py): the same records, lifelong rows and final
weights, bit for bit, as a run that never stopped; a damaged checkpoint or other settings are refused."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_pl.errors import ConfigError, DamagedFile
from kedit_pl.io import read_tensors
from kedit_pl.methods.memit import MEMIT
from kedit_pl.methods.rome import ROME
from kedit_pl.pipeline import run_edit
from kedit_pl.run_folder import SEQUENTIAL_STATE
from kedit_pl.sequential_state import SequentialState
from tests.conftest import edit_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


class Killed(RuntimeError):
    """Stands for a run stopped from outside (a kill, a crash) in the middle of a batch."""


def settings(tmp_path, method: str, *extra: str) -> list[str]:
    """4 sequential batches on the tiny model, everything recomputed (no z or pre-score cache to hide a difference)."""
    return [f"method={method}", "edit.mode=sequential", "dataset.limit=4", "method.v_num_grad_steps=3",
            "eval.cache_pre=false", "edit.lifelong.sample=2", "edit.lifelong.perplexity.n_tokens=300",
            f"stats.cache_dir={tmp_path}/cache", "stats.n_samples=800", "stats.seq_len=60", *extra]


def kill_after(monkeypatch, cls: type, n_batches: int) -> None:
    """`cls.compute_edit` fails in the batch after the first `n_batches`."""
    real, calls = cls.compute_edit, []

    def compute_edit(self, requests):
        calls.append(len(requests))
        if len(calls) > n_batches:
            raise Killed("killed in the middle of a batch")
        return real(self, requests)

    monkeypatch.setattr(cls, "compute_edit", compute_edit)


def outcome(folder) -> tuple[list, list, dict[str, torch.Tensor]]:
    """records.jsonl's numbers, lifelong.jsonl's rows (without timings) and the checkpoint's tensors (the final
    weights of every edited parameter and the method's state)."""
    records = [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]
    numbers = [{k: r[k] for k in ("case_id", "batch", "pre", "post", "final")} for r in records]
    rows = [{k: v for k, v in json.loads(x).items() if k != "seconds"}
            for x in (folder / "lifelong.jsonl").read_text().splitlines()]
    tensors, _ = read_tensors(folder / SEQUENTIAL_STATE, "test")
    return numbers, rows, {k: v for k, v in tensors.items() if not k.startswith("rng/")}


def assert_resumes_exactly(tmp_path, monkeypatch, method: str, cls: type, *extra: str, cut_after: int = 2) -> dict:
    """Kill a run in its batch after the first `cut_after`, after that batch's records were written; resume it."""
    args = settings(tmp_path, method, *extra)
    whole = run_edit(edit_cfg(tmp_path / "whole", *args))
    kill_after(monkeypatch, cls, cut_after)
    with pytest.raises(Killed):
        run_edit(edit_cfg(tmp_path / "cut", *args))
    cut = tmp_path / "cut" / "records.jsonl"
    assert len(cut.read_text().splitlines() if cut.exists() else []) == cut_after
    assert (tmp_path / "cut" / SEQUENTIAL_STATE).exists() == (cut_after > 0)
    with cut.open("a") as f:  # as if killed after a batch's records were written, before its checkpoint
        f.write((tmp_path / "whole" / "records.jsonl").read_text().splitlines()[cut_after] + "\n")
    monkeypatch.undo()
    resumed = run_edit(edit_cfg(tmp_path / "cut", *args, "edit.resume=true"))
    (n1, rows1, t1), (n2, rows2, t2) = outcome(tmp_path / "whole"), outcome(tmp_path / "cut")
    assert [r["batch"] for r in n2] == [0, 1, 2, 3] and [r["n_edits"] for r in rows2] == [0, 1, 2, 3, 4]
    assert n2 == n1 and rows2 == rows1
    assert t1.keys() == t2.keys() and all(torch.equal(t1[k], t2[k]) for k in t1), "final weights differ"
    for key in ("pre", "post", "final", "retention"):
        assert resumed[key] == whole[key]
    assert rows2[-1]["delta_norm_total"] > 0  # the edits changed the weights
    state = SequentialState.read(tmp_path / "cut" / SEQUENTIAL_STATE)
    assert state.batches == 4 and state.edited == [r["case_id"] for r in n1]
    assert 0 < state.wall_seconds <= resumed["timing"]["wall_seconds"]  # the wall time sums both runs
    return t2


def test_interrupted_memit_run_resumes_bit_exact(tmp_path, monkeypatch):
    extra = ("method.z_cache=false", "eval.samples.k=3", "eval.samples.max_new_tokens=3")  # with generations
    tensors = assert_resumes_exactly(tmp_path, monkeypatch, "memit", MEMIT, *extra)
    assert any(k.startswith("weight/") for k in tensors)
    records = [json.loads(x) for x in (tmp_path / "cut" / "records.jsonl").read_text().splitlines()]
    assert ["samples" in r["final"] for r in records] == [True, True, True, False]
    folder = tmp_path / "cut"
    # a finished run: nothing to do
    assert run_edit(edit_cfg(folder, *settings(tmp_path, "memit", *extra), "edit.resume=true"))["final"]["n_records"] == 4
    # another method setting is refused by the run folder's identity
    with pytest.raises(ConfigError, match="edit.resume: this run differs.*method_config.mom2_update_weight"):
        run_edit(edit_cfg(folder, *settings(tmp_path, "memit", *extra, "method.mom2_update_weight=100"),
                          "edit.resume=true"))
    with pytest.raises(ConfigError, match="edit.resume: this run differs.*lifelong.sample: 2 in the folder, 3 now"):
        run_edit(edit_cfg(folder, *settings(tmp_path, "memit", *extra), "edit.lifelong.sample=3", "edit.resume=true"))


def test_run_cut_off_in_its_first_batch_starts_again_from_the_unedited_model(tmp_path, monkeypatch, caplog):
    """No checkpoint yet, but the first batch's records: the batch is redone (issue 29; was refused, blaming MEMIT
    for not checkpointing)."""
    assert_resumes_exactly(tmp_path, monkeypatch, "memit", MEMIT, "method.z_cache=false", cut_after=0)
    assert "cut off in its first batch, before its first checkpoint; its 1 record(s) are redone" in caplog.text


def test_interrupted_alphaedit_run_resumes_with_its_accumulated_keys(tmp_path, monkeypatch):
    from kedit_pl.methods.alphaedit import AlphaEdit

    tensors = assert_resumes_exactly(tmp_path, monkeypatch, "alphaedit", AlphaEdit, "method.z_cache=false")
    assert int(tensors["method/kp_count"]) == 4 and any(k.startswith("method/kp_sum.") for k in tensors)


def test_interrupted_rome_run_resumes_bit_exact(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    assert_resumes_exactly(tmp_path, monkeypatch, "rome", ROME, "edit.save=model")
    whole, cut = (load_file(tmp_path / f / "model" / "model.safetensors") for f in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)  # every weight
    edits = [json.loads((tmp_path / f / "model" / "kedit_edits.json").read_text()) for f in ("whole", "cut")]
    assert len(edits[1]) == 4 and edits[1] == edits[0]  # the saved model lists the edits of both runs


def test_damaged_checkpoint_or_records_is_one_clear_error(tmp_path, monkeypatch):
    args = settings(tmp_path, "memit", "method.mom2_adjustment=false", "edit.lifelong.every=0")
    kill_after(monkeypatch, MEMIT, 2)
    with pytest.raises(Killed):
        run_edit(edit_cfg(tmp_path, *args))
    monkeypatch.undo()
    path = tmp_path / SEQUENTIAL_STATE
    good = path.read_bytes()
    data = bytearray(good)
    data[-20] ^= 0xFF  # a flipped bit in the tensors
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedFile, match=f"edit.resume: {path} is damaged .*edit.overwrite=true"):
        run_edit(edit_cfg(tmp_path, *args, "edit.resume=true"))
    path.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(DamagedFile, match=f"edit.resume: {path} is damaged or not a safetensors file"):
        run_edit(edit_cfg(tmp_path, *args, "edit.resume=true"))
    path.write_bytes(good)
    records = tmp_path / "records.jsonl"
    lines = records.read_text()
    records.write_text(lines.splitlines()[0] + "\n")  # a record the checkpoint holds is gone
    with pytest.raises(DamagedFile, match="records.jsonl lacks 1 record"):
        run_edit(edit_cfg(tmp_path, *args, "edit.resume=true"))
    records.write_text(lines)
    path.unlink()  # two batches done, their checkpoint gone: the cause is named, not the method
    with pytest.raises(DamagedFile, match=f"records of 2 sequential batches but {path}, written after each batch, "
                                          f"is missing"):
        run_edit(edit_cfg(tmp_path, *args, "edit.resume=true"))


def test_resume_of_a_method_that_cannot_checkpoint_names_the_method(tmp_path):
    from kedit_pl.methods.serac.method import Serac
    from kedit_pl.sequential_state import resume_point

    (tmp_path / "records.jsonl").write_text(json.dumps({"case_id": "0", "batch": 0}) + "\n")
    with pytest.raises(ConfigError, match="Serac cannot continue a sequential run .*not checkpointed"):
        resume_point(tmp_path, Serac)
    assert resume_point(tmp_path, MEMIT) is None and not (tmp_path / "records.jsonl").exists()
