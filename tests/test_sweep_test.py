"""The best trial of a dev sweep, evaluated once on test (python -m kedit_pl.sweep_test)."""
import json

import pytest
from omegaconf import OmegaConf

from kedit_pl.errors import ConfigError
from kedit_pl.io import write_json
from kedit_pl.sweep_test import main, run_sweep_test


def trial(path, steps: int, score: float, split: str = "dev"):
    (path / ".hydra").mkdir(parents=True)
    overrides = ["model=tiny_llama", "logger=csv", "method=ft", "method.lr=1e-2", f"method.steps={steps}",
                 "dataset.split=dev", "dataset.limit=2", "hydra.run.dir=x"]
    OmegaConf.save(OmegaConf.create(overrides), path / ".hydra" / "overrides.yaml")
    OmegaConf.save(OmegaConf.create({"optimized_metric": "post/score"}), path / ".hydra" / "config.yaml")
    write_json(path / "summary.json", {"post": {"score": score}, "ci": {"post": {"score": [score - 5, score + 5]}},
                                       "timing": {"n_edits": 2}, "run": {"split": split, "records_sha256": "d"}})


def test_best_dev_trial_runs_once_on_test(tmp_path, capsys):
    trial(tmp_path / "0_ft", 1, 40.0)
    trial(tmp_path / "1_ft", 3, 60.0)
    res = run_sweep_test(tmp_path, limit=2)
    assert res["best_trial"] == str(tmp_path / "1_ft") and res["dev"]["value"] == 60.0
    test = json.loads((tmp_path / "test_best" / "summary.json").read_text())
    assert test["run"]["split"] == "test" and test["run"]["config"]["steps"] == 3 and test["timing"]["n_edits"] == 2
    assert res["test"]["value"] == test["post"]["score"] and res["test"]["ci"] == test["ci"]["post"]["score"]
    assert "method.steps=3" in res["command"] and "dataset.split=test" in res["command"]
    assert "dataset.split=dev" not in res["command"] and "hydra.run.dir" not in res["command"]
    assert json.loads((tmp_path / "test_best" / "sweep_test.json").read_text()) == res


def test_a_sweep_not_on_dev_is_refused(tmp_path, capsys):
    trial(tmp_path / "0_ft", 1, 40.0, split="all")
    with pytest.raises(ConfigError, match="not dev"):
        run_sweep_test(tmp_path, limit=2)
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2 and "dataset.split=dev" in capsys.readouterr().err


def test_options_and_overrides_mix_on_the_command_line(tmp_path, monkeypatch):
    """`DIR --limit 200 logger=csv` (the documented order) parses as `DIR logger=csv --limit 200` does."""
    import kedit_pl.sweep_test as st

    seen = []
    monkeypatch.setattr(st, "run_sweep_test", lambda *a: seen.append(a) or {
        "best_trial": "t", "metric": "post/score", "dev": {"value": 1.0, "n": 1}, "test": {"value": 1.0, "n": 1},
        "command": "python edit.py"})
    main([str(tmp_path), "--limit", "7", "logger=csv", "seed=1"])
    main([str(tmp_path), "logger=csv", "seed=1", "--limit", "7"])
    assert seen[0] == seen[1] == (tmp_path, 7, None, None, ["logger=csv", "seed=1"])
