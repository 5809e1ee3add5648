"""The framework end to end on the tiny model: composition, protocol modes, outputs, restore, errors."""
import json
import subprocess
import sys
import time

import pytest
import torch
from omegaconf import OmegaConf

from kedit_pl.config import CONF_DIR, REPO_ROOT, compose
from kedit_pl.data.datamodule import load_split
from kedit_pl.pipeline import build_method, drop_uneditable, run_edit
from tests.conftest import edit_cfg

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "hf")  # hf needs model.path: test_arch_matrix.py
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (CONF_DIR / "logger").glob("*.yaml"))
TRAINERS = sorted(p.stem for p in (CONF_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_every_model_method_pair_composes_and_resolves(model, method):
    cfg = compose("edit", [f"model={model}", f"method={method}", "paths.output_dir=/tmp/x"])
    OmegaConf.to_container(cfg.method, resolve=True)  # per-model defaults interpolate
    OmegaConf.to_container(cfg.model, resolve=True)
    assert cfg.method.name == method and cfg.model.name == model


@pytest.mark.parametrize("group, options", [("dataset", DATASETS), ("logger", LOGGERS), ("trainer", TRAINERS)])
def test_every_other_group_option_composes(group, options):
    for opt in options:
        cfg = compose("edit", [f"{group}={opt}", "paths.output_dir=/tmp/x"])
        OmegaConf.to_container(cfg[group], resolve=True)
    if group == "dataset":
        for opt in options:
            cfg = compose("edit", [f"dataset={opt}", "paths.output_dir=/tmp/x"])
            assert load_split(cfg.dataset.path, cfg.dataset.format, "skip")


def test_train_config_and_sweep_compose():
    compose("train", ["paths.output_dir=/tmp/x"])
    for p in (CONF_DIR / "hparams_search").glob("*.yaml"):
        compose("edit", [f"hparams_search={p.stem}", "paths.output_dir=/tmp/x"])


def test_single_mode_end_to_end_on_tiny_model(tmp_path):
    cfg = edit_cfg(tmp_path, "method=ft", "method.steps=40", "method.lr=1e-2")
    summary = run_edit(cfg)
    assert summary["post"]["es"] == 100.0            # FT with many steps must flip the rewrite prompt
    assert summary["pre"]["es"] < 100.0 or summary["pre"]["ns"] > 0
    assert summary["timing"]["n_edits"] == 3
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["post"]["es"] == 100.0 and saved["run"]["method"] == "ft"
    assert saved["ci"]["post"]["es"] == [100.0, 100.0]  # a constant metric's interval is a point
    assert set(saved["ci"]["pre"]) >= {"es", "ps", "ns", "score"} and saved["ci_method"]["resamples"] >= 1000
    lo, hi = saved["ci"]["pre"]["ns"]
    assert lo <= saved["pre"]["ns"] <= hi
    assert saved["run"]["split"] == "all" and len(saved["run"]["records_sha256"]) == 64
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {"pre", "post", "seconds"} <= set(json.loads(lines[0]))
    assert (tmp_path / "metrics.png").stat().st_size > 0
    assert list(tmp_path.glob("csv/*/metrics.csv"))


def test_single_mode_restores_between_edits(tmp_path, tiny_llama):
    cfg = edit_cfg(tmp_path, "method=ft", "method.lr=1e-2")
    method = build_method(cfg, loaded=tiny_llama)
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    reqs = load_split(cfg.dataset.path, cfg.dataset.format)[:2]
    handle = method.apply(reqs[:1])
    changed = [n for n, p in tiny_llama.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == method.edited_parameters(reqs[:1])
    method.restore(handle)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_batch_and_sequential_modes(tmp_path):
    s = run_edit(edit_cfg(tmp_path / "b", "method=ft", "edit.mode=batch", "edit.batch_size=3", "method.lr=1e-2"))
    assert s["timing"]["n_edits"] == 3 and "final" not in s
    s = run_edit(edit_cfg(tmp_path / "s", "method=ft", "edit.mode=sequential", "edit.batch_size=1",
                          "method.lr=1e-2", "method.steps=40"))
    assert "final" in s and s["final"]["n_records"] == 3 and set(s["ci"]) == {"pre", "post", "final"}
    recs = [json.loads(x) for x in (tmp_path / "s" / "records.jsonl").read_text().splitlines()]
    assert all("final" in r for r in recs)
    ret = s["retention"]
    assert [r["batch"] for r in ret] == [0, 1, 2] and all(r["post"]["n_records"] == 1 for r in ret)
    last = ret[-1]  # nothing was applied after the last batch
    assert all(last["final"][k] == last["post"][k] for k in ("es", "ps", "ns"))
    assert (tmp_path / "s" / "retention.png").is_file()


def test_resume_skips_finished_records(tmp_path):
    run_edit(edit_cfg(tmp_path, "method=ft", "dataset.limit=2"))
    s = run_edit(edit_cfg(tmp_path, "method=ft", "dataset.limit=3", "edit.resume=true"))
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and s["timing"]["n_edits"] == 3


def test_resumed_run_wall_time_adds_the_earlier_runs(tmp_path):
    """A resume's summary counts the earlier invocation's wall time (up to its last record line) plus its own."""
    run_edit(edit_cfg(tmp_path, "method=ft", "dataset.limit=2"))
    path = tmp_path / "records.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0]["invocation"] == rows[1]["invocation"] and 0 < rows[0]["elapsed"] <= rows[1]["elapsed"]
    rows[1]["elapsed"] = 1000.0  # as if the first run had taken 1,000 s up to its last record
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.perf_counter()
    s = run_edit(edit_cfg(tmp_path, "method=ft", "dataset.limit=3", "edit.resume=true"))
    own = time.perf_counter() - t0
    new = json.loads(path.read_text().splitlines()[2])
    assert new["invocation"] != rows[0]["invocation"]
    assert 1000.0 < s["timing"]["wall_seconds"] <= 1000.0 + own


def test_wandb_offline_run_holds_metrics(tmp_path):
    run_edit(edit_cfg(tmp_path, "method=ft", "logger=wandb", "dataset.limit=1"))
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run folder"
    # offline runs store history as protobuf records in run-*.wandb; metric keys appear verbatim. W&B's service
    # process writes that file asynchronously, so it may still be flushing when run_edit returns: wait for it.
    keys = (b"pre/es", b"post/es", b"post/ps", b"post/ns", b"post/score", b"timing/seconds_per_edit", b"post/es_lo",
            b"post/score_hi")
    deadline = time.monotonic() + 60
    while True:
        data = b"".join(p.read_bytes() for p in runs[0].glob("run-*.wandb"))
        missing = [k for k in keys if k not in data]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing


def _cli(tmp_path, *args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "edit.py"), f"hydra.run.dir={tmp_path}/run", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize("args, needle", [
    (["model=no_such_model"], "no_such_model"),
    (["model=tiny_llama", "dataset.path=/no/such/file.json"], "dataset.path"),
    (["model=tiny_llama", "method.steps=0"], "method.steps"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, needle):
    r = _cli(tmp_path, "logger=csv", *args)
    assert r.returncode != 0
    err_lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert any(needle in ln for ln in err_lines) and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_uneditable_records_are_skipped_and_listed_or_fail_up_front():
    from types import SimpleNamespace

    from kedit_pl.data.requests import EditRequest
    from kedit_pl.errors import InvalidRecord

    class Picky:  # a method that cannot edit one record (as ROME with a subject that merges in context)
        def request_problem(self, req):
            return "subject tokenizes differently" if req.case_id == "bad" else None

    reqs = [EditRequest(case_id=c, subject="S", prompt="{} is", target_true="a", target_new="b") for c in "x bad y".split()]
    dm = SimpleNamespace(requests=list(reqs))
    skipped = drop_uneditable(Picky(), dm, skip=True)
    assert skipped == [{"case_id": "bad", "reason": "subject tokenizes differently"}]
    assert [r.case_id for r in dm.requests] == ["x", "y"]
    dm = SimpleNamespace(requests=list(reqs))
    with pytest.raises(InvalidRecord, match="1 record.*tokenizes differently.*skip_invalid"):
        drop_uneditable(Picky(), dm, skip=False)
    assert len(dm.requests) == 3
    with pytest.raises(InvalidRecord, match="every selected record"):
        drop_uneditable(Picky(), SimpleNamespace(requests=[reqs[1]]), skip=True)
