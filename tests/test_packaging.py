"""Configs and data found through the package (kedit_pl/config.py), the bundled sample, and the console scripts
(fast; the built wheel itself is tests/test_wheel.py)."""
from __future__ import annotations

import importlib
import json
import logging
import tomllib

import pytest

import kedit_pl.config as config
from kedit_pl.config import CONF_DIR, REPO_ROOT, SAMPLE_DATA_DIR, compose, data_dir, missing_data
from kedit_pl.data.readers import read_requests
from kedit_pl.errors import ConfigError

SAMPLES = {"counterfact": "counterfact/derived/counterfact_rome_format_union.json",
           "zsre": "zsre/mend_format/zsre_mend_eval_portability_gpt4.json"}


def test_a_clone_reads_its_own_conf():
    assert CONF_DIR == REPO_ROOT / "conf" and config.IN_CLONE
    assert not (config.PACKAGE_DIR / "conf").exists()  # conf/ is mapped into the wheel at build time only


@pytest.mark.parametrize("fmt", sorted(SAMPLES))
def test_the_bundled_sample_is_ten_valid_records_of_the_full_files(fmt):
    from tests.conftest import DATA_DIR

    sample = json.loads((SAMPLE_DATA_DIR / SAMPLES[fmt]).read_text())
    assert len(sample) == 10
    assert all(err is None for _, err in read_requests(fmt, SAMPLE_DATA_DIR / SAMPLES[fmt]))
    full = DATA_DIR / SAMPLES[fmt]
    if full.is_file():  # the first 10 records of the benchmark file, unchanged
        assert sample == json.loads(full.read_text())[:10]
    assert (SAMPLE_DATA_DIR / "SOURCES.md").is_file()


def test_data_dir_order_env_then_beside_then_the_sample(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KEDIT_DATA_DIR", str(tmp_path / "mine"))
    assert data_dir() == str(tmp_path / "mine")
    monkeypatch.delenv("KEDIT_DATA_DIR")
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "clone")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    assert data_dir() == str(tmp_path / "shared" / "data")
    (tmp_path / "shared" / "data").rmdir()
    monkeypatch.setattr(config, "_said_sample", [])
    with caplog.at_level(logging.WARNING, logger="kedit_pl"):
        assert data_dir() == str(SAMPLE_DATA_DIR)
        assert data_dir() == str(SAMPLE_DATA_DIR)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "bundled" in said[0] and "KEDIT_DATA_DIR" in said[0] and "../shared/data" in said[0]
    cfg = compose("edit", ["paths.output_dir=/tmp"])
    assert cfg.dataset.path == str(SAMPLE_DATA_DIR / SAMPLES["counterfact"])


def test_missing_data_says_where_to_put_it():
    msg = missing_data("stats.corpus", SAMPLE_DATA_DIR / "text" / "wikitext-2-raw" / "wiki.test.raw")
    assert msg.startswith("stats.corpus: file not found: ") and "only 10 CounterFact and 10 zsRE" in msg
    assert "KEDIT_DATA_DIR" in msg and "../shared/data" in msg
    with pytest.raises(ConfigError, match=r"dataset.path: file not found: /nowhere/x.json \(put the benchmark data"):
        list(read_requests("counterfact", "/nowhere/x.json"))


def test_console_scripts_are_the_hydra_entry_points():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"kedit-edit", "kedit-train", "kedit-locate", "kedit-trace", "kedit-compare", "kedit-h2h"}
    for target in scripts.values():
        module, fn = target.split(":")
        assert callable(getattr(importlib.import_module(module), fn))
    for name in ("edit", "train", "locate", "trace"):  # the root scripts are thin wrappers of the same mains
        text = (REPO_ROOT / f"{name}.py").read_text()
        assert f"from kedit_pl.cli.{name} import" in text and "hydra.main" not in text
    from kedit_pl.cli import CONFIG_PATH

    assert CONFIG_PATH == str(CONF_DIR)
