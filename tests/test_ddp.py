"""Runs over two processes with Lightning's DDP strategy (CPU, gloo) on the tiny model: the same results as one
process, one run folder, resume, MEMIT's z vectors shared, learned-editor training, and failures.

The two-process runs start the real entry points (Lightning re-launches the script for rank 1); the one-process
references run in this process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kedit_pl.config import REPO_ROOT
from kedit_pl.errors import ConfigError
from kedit_pl.eval.metrics import record_metrics
from kedit_pl.methods.mend_net import GradientEditor
from kedit_pl.pipeline import run_edit, run_train
from tests.conftest import edit_cfg

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
two_cores = pytest.mark.skipif(CORES < 2, reason="two DDP processes need two CPU cores")
DDP = ["trainer.devices=2", "trainer.strategy=ddp"]
#: no cross-run caches: each run computes its own pre scores (and MEMIT its own z)
FRESH = ["eval.cache_pre=false"]


def launch(script: str, out: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python <script> model=tiny_llama logger=csv hydra.run.dir=<out> ...` from the repository root."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), "WANDB_MODE": "offline"} | (env or {})
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, str(REPO_ROOT / script), "model=tiny_llama", "logger=csv", f"hydra.run.dir={out}",
           *overrides]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)


def records(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "records.jsonl").read_text().splitlines()]


def assert_same_records(one: list[dict], two: list[dict], atol: float = 1e-5, batches: bool = True) -> None:
    """Same records in the same order (and batches, unless a resume renumbered them), the same per-prompt scores
    (NLLs within float noise of other batch shapes) and exactly the same ES/PS/NS outcomes."""
    assert [d["case_id"] for d in one] == [d["case_id"] for d in two]
    for a, b in zip(one, two):
        assert a["batch"] == b["batch"] or not batches
        for state in ("pre", "post"):
            assert record_metrics(a[state]) == pytest.approx(record_metrics(b[state]), abs=1e-6)
            for kind in ("rewrite", "paraphrase", "neighborhood"):
                for target in ("new", "true"):
                    x = [s["nll"] for s in a[state][kind][target]]
                    y = [s["nll"] for s in b[state][kind][target]]
                    assert x == pytest.approx(y, abs=atol), (a["case_id"], state, kind, target)


def assert_one_folder(out: Path, runs: int = 1) -> None:
    """Rank 0 owns the folder: its Hydra files, its identity, one logger output per run; no per-rank record files."""
    assert (out / ".hydra").is_dir() and (out / "run.json").is_file()
    assert not list(out.glob("records.rank*.jsonl"))
    assert sorted(p.name for p in (out / "csv").iterdir()) == [f"version_{i}" for i in range(runs)]
    assert (out / "train_ddp_process_1.log").is_file()  # rank 1's Hydra log, in rank 0's folder (Lightning's name)


# --- bad input: one line, nothing loaded, nothing left ----------------------------------------------------------
def test_more_devices_than_cores_is_one_line_before_anything_loads(tmp_path):
    out = tmp_path / "run"
    p = launch("edit.py", out, f"trainer.devices={CORES + 1}", "trainer.strategy=ddp")
    assert p.returncode == 2
    assert p.stderr.strip() == (f"error: trainer.devices: {CORES + 1} processes asked for, but this machine has {CORES} "
                                f"CPU core(s) available to this process (os.sched_getaffinity); use "
                                f"trainer.devices<={CORES}")
    assert not out.exists()


@pytest.mark.parametrize("overrides, field", [
    (["trainer.devices=2"], "trainer.strategy"),                                   # no strategy: Lightning's default
    (["trainer.devices=2", "trainer.strategy=ddp_spawn"], "trainer.strategy"),
    (["trainer.devices=0", "trainer.strategy=ddp"], "trainer.devices"),
    (DDP + ["edit.mode=sequential"], "edit.mode=sequential"),                      # edits accumulate in one model
    (DDP + ["edit.show=2"], "edit.show"),
    (DDP, "multi-process runs start from edit.py"),                                # not from Python
])
def test_requests_a_multi_process_run_cannot_honour(tmp_path, overrides, field):
    if CORES < 2 and "trainer.devices=2" in overrides:
        pytest.skip("needs two cores to get past the device check")
    with pytest.raises(ConfigError, match=field):
        run_edit(edit_cfg(tmp_path, *overrides))
    assert not (tmp_path / "run.json").exists()


# --- edits ------------------------------------------------------------------------------------------------------
@two_cores
def test_two_processes_give_the_records_of_one_and_resume_from_rank_files(tmp_path):
    """Single mode, batches spread over the ranks: the same per-record results as one process. The two-process
    run resumes a DDP run interrupted with its first records still in per-rank files."""
    common = ["method=ft", "method.lr=1e-2", "dataset.limit=6", *FRESH]
    one = run_edit(edit_cfg(tmp_path / "one", *common))
    out = tmp_path / "two"
    out.mkdir()
    (out / "run.json").write_bytes((tmp_path / "one" / "run.json").read_bytes())  # the same run identity
    done = records(tmp_path / "one")[:2]  # as an interrupted 2-process run leaves them: one file per rank
    for rank in (0, 1):
        (out / f"records.rank{rank}.jsonl").write_text(json.dumps(done[rank]) + "\n")
    p = launch("edit.py", out, *common, *DDP, "edit.resume=true")
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_records(records(tmp_path / "one"), records(out), batches=False)  # a resume numbers batches anew
    assert_one_folder(out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timing"]["processes"] == 2 and len(summary["timing"]["peak_rss_mb_per_rank"]) == 2
    assert summary["timing"]["n_edits"] == 6
    for group in ("pre", "post"):
        assert summary[group] == pytest.approx(one[group], abs=1e-6)
        assert summary["ci"][group].keys() == one["ci"][group].keys()  # the records, gathered, in run order
        for k, ci in one["ci"][group].items():
            assert summary["ci"][group][k] == pytest.approx(ci, abs=1e-6), k
    assert summary["run"]["records_sha256"] == one["run"]["records_sha256"]
    with pytest.raises(ConfigError, match="method_config.lr: 0.01 in the folder, 0.001 now"):  # identity kept
        run_edit(edit_cfg(out, *common, "edit.resume=true", "method.lr=1e-3"))


@two_cores
def test_memit_batch_shared_by_two_processes_equals_one(tmp_path):
    """A MEMIT batch under DDP: each rank optimizes whole z groups, the z are all-gathered, every rank solves the
    same update. The edit (saved as a patch by rank 0) equals the one-process edit, and so do the records."""
    common = ["method=memit", "edit.mode=batch", "edit.batch_size=4", "dataset.limit=4", "method.z_batch_size=2",
              "method.z_cache=false", "edit.save=patch", *FRESH]
    run_edit(edit_cfg(tmp_path / "one", *common))
    out = tmp_path / "two"
    p = launch("edit.py", out, *common, *DDP)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_records(records(tmp_path / "one"), records(out))
    assert_one_folder(out)
    (a,), (b,) = (list((tmp_path / d / "patches").glob("*.safetensors")) for d in ("one", "two"))
    pa, pb = load_file(a), load_file(b)
    assert pa.keys() == pb.keys() and any("left" in k for k in pa)
    for k in pa:
        if pa[k].is_floating_point():
            assert (pa[k] - pb[k]).norm() <= 1e-6 * pa[k].norm(), k
    info = records(out)[0]["info"]
    assert len(info["z_seconds_per_rank"]) == 2 and all(s > 0 for s in info["z_seconds_per_rank"])  # both worked
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["edit_info"]["z_steps_mean"] <= 24  # v_num_grad_steps = 25: at most 24 Adam steps


@two_cores
@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)])
def test_a_failing_rank_fails_the_run_without_a_summary(tmp_path, rank):
    out = tmp_path / "run"
    p = launch("tests/ddp_fail.py", out, "method=ft", "dataset.limit=4", *DDP, *FRESH,
               env={"KEDIT_TEST_FAIL_RANK": str(rank)})
    assert p.returncode != 0
    assert f"error: {'[rank 1] ' if rank else ''}injected failure on rank {rank}" in p.stderr
    assert not (out / "summary.json").exists() and not (out / "records.jsonl").exists()


# --- learned-editor training -------------------------------------------------------------------------------------
def _zsre(path: Path, n: int = 40) -> str:
    """zsRE-format training records; one shared locality pair, so every rank's KL term averages the same tokens."""
    rows = [{"case_id": i, "subject": f"Person {i}", "src": f"What is the native language of Person {i}?",
             "rephrase": f"What is Person {i}'s mother tongue?", "alt": ["German", "Dutch", "Spanish"][i % 3],
             "answers": ["French"], "loc": "nq question: who wrote hamlet", "loc_ans": "William Shakespeare"}
            for i in range(n)]
    path.write_text(json.dumps(rows))
    return str(path)


def _train_common(tmp_path: Path, *extra: str) -> list[str]:
    return ["method=mend", "method.rank=8", "method.lr=1e-3", "method.lr_lr=1e-5", "dataset=zsre",
            f"dataset.train.path={_zsre(tmp_path / 'train.json')}", "train.val_edits=2",
            "trainer.val_check_interval=4", "+trainer.limit_val_batches=1", "trainer.max_steps=4",
            "train.checkpoint_every_n_steps=1", *extra]


def _state(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The editor's state (weights and statistics) and Adam's first moments, from last.ckpt."""
    ckpt = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    moments = torch.cat([s["exp_avg"].flatten() for _, s in sorted(ckpt["optimizer_states"][0]["state"].items())])
    return ckpt["state_dict"], moments


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.slow
@two_cores
@pytest.mark.parametrize("method", ["mend", "ke"])
def test_training_on_two_processes_equals_one_with_accumulated_gradients(tmp_path, method):
    """DDP averages the two ranks' gradients: exactly one process accumulating the same two half batches (KE: its
    Lagrange multiplier ascends once per step, on the all-reduced / accumulated gradient)."""
    common = _train_common(tmp_path, "method.norm=false", "train.batch_size=2")
    if method == "ke":
        common = ["method=ke", "method.max_scale=20", "method.lr=1e-3", "method.lr_alpha=0.1"] + [
            o for o in common if not o.startswith(("method.", "method="))]
    run_train(edit_cfg(tmp_path / "one", *common, "+trainer.accumulate_grad_batches=2", config_name="train"))
    out = tmp_path / "two"
    p = launch("train.py", out, *common, *DDP)
    assert p.returncode == 0, p.stderr[-3000:]
    (w1, m1), (w2, m2) = _state(tmp_path / "one"), _state(out)
    assert _rel(m2, m1) < 1e-6 and all(_rel(w2[k], w1[k]) < 1e-6 for k in w1 if w1[k].norm() > 0)
    assert json.loads((out / "train_summary.json").read_text())["processes"] == 2
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [".hydra", "checkpoints", "csv", "editor"]


@pytest.mark.slow
@two_cores
def test_training_on_two_processes_matches_one_with_the_doubled_batch(tmp_path):
    """MEND's statistics see every rank's rows, as one process with the doubled batch; the editor weights agree
    within tolerance. (Adam's moments do not: a MEND training batch applies its edits together, so the doubled
    batch's gradient has cross terms between the halves; the test above checks the exact equivalent.)"""
    common = _train_common(tmp_path)
    run_train(edit_cfg(tmp_path / "one", *common, "train.batch_size=4", config_name="train"))
    run_train(edit_cfg(tmp_path / "half", *common, "train.batch_size=2", config_name="train"))
    out = tmp_path / "two"
    p = launch("train.py", out, *common, *DDP, "train.batch_size=2")
    assert p.returncode == 0, p.stderr[-3000:]
    (w1, _), (w2, _), (wh, _) = _state(tmp_path / "one"), _state(out), _state(tmp_path / "half")
    stats = [k for k in w1 if k.endswith(("count", "mean", "m2"))]
    assert stats and all(_rel(w2[k], w1[k]) < 1e-5 for k in stats)
    assert max(_rel(wh[k], w1[k]) for k in stats) > 0.3  # one process with the half batch: half the rows
    assert all(_rel(w2[k], w1[k]) < 1e-3 for k in w1 if k not in stats and w1[k].norm() > 0)
    exported = load_file(out / "editor" / "editor.safetensors")
    assert exported.keys() and (out / "train_summary.json").is_file()


def test_statistics_merge_every_ranks_rows_like_one_batch():
    """GradientEditor.update_stats with a gather of two ranks' (n, mean, M2) equals one update on all rows
    (including a rank with no rows)."""
    torch.manual_seed(0)
    rows = torch.randn(7, 12) * 3 + 1
    whole, split = GradientEditor(4, 8, 1, 2, 0, True), GradientEditor(4, 8, 1, 2, 0, True)
    whole.update_stats(rows[:3])
    split.update_stats(rows[:3])
    whole.update_stats(rows[3:])
    parts = [rows[3:5], rows[5:], rows[:0]]

    def gather(mine: torch.Tensor) -> torch.Tensor:  # what each rank would contribute, in rank order
        out = []
        for z in parts:
            m = z.mean(0) if len(z) else torch.zeros(12)
            out.append(torch.cat([torch.tensor([float(len(z))]), m, ((z - m) ** 2).sum(0)]))
        return torch.stack(out)

    split.gather = gather
    split.update_stats(rows[3:5])
    for name in ("count", "mean", "m2"):
        torch.testing.assert_close(getattr(split, name), getattr(whole, name), rtol=1e-6, atol=1e-6)


@two_cores
def test_head_to_head_runs_each_method_over_two_processes_like_one(tmp_path, monkeypatch):
    """`python -m kedit_pl.head_to_head trainer.devices=2 trainer.strategy=ddp`: each method is an edit.py child over
    2 ranks, in its folder, with the records of the in-process (one-process) head to head."""
    from kedit_pl.head_to_head import run_head_to_head

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    common = ["model=tiny_llama", "logger=csv", "dataset.limit=4", "head_to_head.methods=[ft]", "method.lr=1e-2",
              "eval.metrics=[es_ps_ns,portability]", *FRESH]
    one = run_head_to_head([*common, f"head_to_head.out_dir={tmp_path / 'one'}"])
    two = run_head_to_head([*common, *DDP, f"head_to_head.out_dir={tmp_path / 'two'}"])
    assert two["methods"]["ft"]["status"] == "ran", two["methods"]
    assert (tmp_path / "two" / "ft.log").is_file() and (tmp_path / "two" / "comparison.md").is_file()
    assert_same_records(records(tmp_path / "one" / "ft"), records(tmp_path / "two" / "ft"))
    summary = json.loads((tmp_path / "two" / "ft" / "summary.json").read_text())
    assert summary["timing"]["processes"] == 2 and one["methods"]["ft"]["status"] == "ran"
    broken = run_head_to_head([*common, *DDP, "method.lr=-", f"head_to_head.out_dir={tmp_path / 'bad'}"])
    assert broken["methods"]["ft"]["status"] == "failed" and "ft.log" in broken["methods"]["ft"]["reason"]
