"""bench/vs_easyedit.py and its shims (bench/easyedit_shims.py), without EasyEdit: the statistics file in the
format EasyEdit's layer_stats reads, the import shim on a stand-in package tree, and the hyperparameter mapping."""
from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from kedit_pl.config import REPO_ROOT, compose


def _load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "bench" / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


shims = _load("bench_easyedit_shims", "easyedit_shims.py")


def test_mom2_file_is_a_second_moment_state_at_easyedits_path(tmp_path):
    rng = np.random.default_rng(0)
    k = rng.standard_normal((50, 6))
    c = k.T @ k / 50
    path = shims.mom2_npz_path(tmp_path, "smollm2_135m_abc", "kedit_wikitext", "model.layers.1.mlp.down_proj",
                               "float64", 50)
    assert path == tmp_path / "smollm2_135m_abc" / "kedit_wikitext_stats" / \
        "model.layers.1.mlp.down_proj_float64_mom2_50.npz"
    shims.write_mom2_npz(path, c, count=50, sample_size=50)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left behind
    with np.load(path, allow_pickle=False) as d:  # EasyEdit loads without pickle
        assert set(d.files) == {"mom2.constructor", "mom2.count", "mom2.mom2", "sample_size"}
        assert str(d["mom2.constructor"]).endswith("SecondMoment()") and int(d["sample_size"]) == 50
        np.testing.assert_allclose(d["mom2.mom2"], k.T @ k, rtol=1e-12)  # the sum; moment() divides by count
    back, count = shims.read_mom2_npz(path)
    assert count == 50 and np.allclose(back, c, rtol=1e-12, atol=0)


def test_mom2_file_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="mom2: expected a square matrix"):
        shims.write_mom2_npz(tmp_path / "x.npz", np.zeros((2, 3)), 1, 1)
    with pytest.raises(ValueError, match="count: must be a positive"):
        shims.write_mom2_npz(tmp_path / "x.npz", np.eye(2), 0, 1)
    with pytest.raises(ValueError, match="sample_size: must be a positive"):
        shims.write_mom2_npz(tmp_path / "x.npz", np.eye(2), 1, None)


def test_import_shim_skips_the_package_inits(tmp_path, monkeypatch):
    """easyeditor/__init__ and easyeditor/models/__init__ import every editor; the shim imports one method alone."""
    pkg = tmp_path / "easyeditor"
    (pkg / "models" / "rome").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the whole package was imported')\n")
    (pkg / "models" / "__init__.py").write_text("raise ImportError('every editor was imported')\n")
    (pkg / "models" / "rome" / "__init__.py").write_text("from .rome_main import VALUE\n")
    (pkg / "models" / "rome" / "rome_main.py").write_text("VALUE = 42\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    assert shims.easyedit_root(str(tmp_path)) == tmp_path
    assert shims.easyedit_root(str(pkg)) == tmp_path
    shims.install_import_shims(tmp_path)
    from easyeditor.models import rome

    assert rome.VALUE == 42
    import datasets  # the real one, or the stub that refuses to load anything

    if getattr(datasets, "__file__", None) is None:
        with pytest.raises(RuntimeError, match="statistics must come from the cache file"):
            datasets.load_dataset("wikitext")


def test_easyedit_root_names_a_bad_folder(tmp_path):
    with pytest.raises(SystemExit, match="--easyedit: .* holds no easyeditor/models/rome"):
        shims.easyedit_root(str(tmp_path))


def test_hyperparameters_are_ours_field_by_field(tmp_path, tiny_llama, monkeypatch):
    vs = _load("bench_vs_easyedit", "vs_easyedit.py")
    from kedit_pl.pipeline import build_method

    for name in ("rome", "memit"):
        cfg = compose("edit", ["model=tiny_llama", f"method={name}", f"paths.output_dir={tmp_path}",
                               f"paths.cache_dir={tmp_path}"])
        method = build_method(cfg, tiny_llama)
        vs.check_matchable(method)
        hp = vs.ee_hparams(method, tmp_path / "model", tmp_path / "stats")
        m = cfg.method
        assert (hp["v_num_grad_steps"], hp["v_lr"], hp["v_weight_decay"], hp["clamp_norm_factor"], hp["kl_factor"]) \
            == (m.v_num_grad_steps, m.v_lr, m.v_weight_decay, m.clamp_norm_factor, m.kl_factor)
        assert hp["rewrite_module_tmp"].format(1) == tiny_llama.spec.module_name("mlp_out", 1)
        assert hp["mom2_n_samples"] == cfg.stats.n_samples and hp["device"] == "cpu"
        if name == "rome":
            assert hp["layers"] == [m.layer] and hp["alg_name"] == "ROME"
            assert hp["context_template_length_params"] == [list(p) for p in m.context_template_length_params]
        else:
            assert hp["layers"] == list(m.layers) and hp["mom2_update_weight"] == m.mom2_update_weight
            monkeypatch.setattr(method, "templates", lambda: ["{}"] + [f"p{i}. {{}}" for i in range(5)])
            assert vs.ee_templates(method) == [["{}"], [f"p{i}. {{}}" for i in range(5)]]


def test_tied_lm_head_is_named_by_the_embedding():
    """EasyEdit's MEMIT reads `<lm_head_module>.weight` by name; a tied head is listed under the embedding only."""
    from types import SimpleNamespace

    vs = _load("bench_vs_easyedit", "vs_easyedit.py")
    spec = SimpleNamespace(mlp_out="m.{}.down", layer="m.{}", mlp="m.{}.mlp", attn="m.{}.attn", final_norm="norm",
                           embed="m.embed", lm_head="lm_head", tied_embeddings=True)
    assert vs.module_templates(spec)["lm_head_module"] == "m.embed"
    spec.tied_embeddings = False
    assert vs.module_templates(spec)["lm_head_module"] == "lm_head"
