"""Lifelong editing: null-space projection (kv/nullspace.py), AlphaEdit, EMMET, r-ROME, the lifelong protocol."""
from __future__ import annotations

import json

import pytest
import torch

import kedit_pl.eval.lifelong as lifelong_mod
import kedit_pl.methods.rome as rome_mod
from kedit_pl.config import compose
from kedit_pl.errors import Collapsed, ConfigError
from kedit_pl.hooks import capture
from kedit_pl.kv.keys import compute_keys, template_keys
from kedit_pl.kv.nullspace import AccumulatedKeys, null_space
from kedit_pl.kv.stats import second_moment
from kedit_pl.kv.values import ValueResult
from kedit_pl.methods.alphaedit import AlphaEdit, alphaedit_update
from kedit_pl.methods.emmet import EMMET, emmet_update
from kedit_pl.methods.memit import MEMIT
from kedit_pl.methods.rome import ROME, CovarianceSolver, rank_one_update
from kedit_pl.pipeline import cli, run_edit
from kedit_pl.tokens import prompt_ids
from tests.conftest import edit_cfg
from tests.test_memit import random_problem
from tests.test_rome import REQ, REQ2, TEXT, assert_untouched, weights

pytestmark = pytest.mark.usefixtures("one_thread")
LAYERS = [0, 1, 2]


def stats_cfg(tmp_path, n_samples: int) -> dict:
    (tmp_path / "corpus.txt").write_text(TEXT, encoding="utf-8")
    return dict(corpus=str(tmp_path / "corpus.txt"), n_samples=n_samples, seq_len=60, batch_size=4,
                cache_dir=str(tmp_path / "cache"), progress=False)


def make(cls, lm, stats, **kw):
    base = dict(layers=LAYERS, context_template_length_params=[[4, 3]], stats=stats, v_num_grad_steps=8)
    return cls(model=lm.model, tokenizer=lm.tokenizer, spec=lm.spec, **{**base, **kw})


def raw_keys(lm, layer: int, n: int) -> torch.Tensor:
    """The first n keys (inputs of the MLP output projection) of the corpus text, (n, d_k)."""
    name = lm.spec.module_name("mlp_out", layer)
    ids = torch.tensor([prompt_ids(lm.tokenizer, TEXT)[:n]])
    with torch.no_grad(), capture(lm.model, [name], inputs=True, outputs=False) as cap:
        lm.model(input_ids=ids, use_cache=False)
    return cap.inputs[name][0].double()


def delta(lm, before: dict, layer: int) -> torch.Tensor:
    name = lm.spec.weight_name("mlp_out", layer)
    return (dict(lm.model.named_parameters())[name].detach().double() - before[name].double())


# --- the projector ---------------------------------------------------------------------------------------
def test_projector_annihilates_preserved_keys(tiny_llama):
    K0 = raw_keys(tiny_llama, 1, 120)  # 120 keys in 256 dimensions: an exact null space exists
    ns = null_space(K0.T @ K0 / len(K0), 1e-10, "relative")
    assert ns.kept == K0.shape[1] - torch.linalg.matrix_rank(K0).item() > 0
    assert (K0 @ ns.projector).norm() < 1e-8 * K0.norm()  # P K₀ ≈ 0
    P = ns.projector
    torch.testing.assert_close(P @ P, P, atol=1e-10, rtol=0)  # an orthogonal projector
    # with more keys than dimensions: ‖P K₀‖² / ‖K₀‖² is exactly the reported leak (Σ kept eigenvalues / trace)
    K0 = raw_keys(tiny_llama, 1, 600)
    ns = null_space(K0.T @ K0 / len(K0), 0.05, "relative")
    assert 0 < ns.kept < ns.dim and 0 < ns.leak < 0.05
    assert abs((K0 @ ns.projector).norm() ** 2 / K0.norm() ** 2 - ns.leak) < 1e-9


def test_threshold_keeping_none_or_all_is_an_error(tiny_llama, tmp_path):
    C = raw_keys(tiny_llama, 1, 600).T @ raw_keys(tiny_llama, 1, 600) / 600
    with pytest.raises(ConfigError, match="keeps no direction"):
        null_space(C, 1e-30, "absolute")
    with pytest.raises(ConfigError, match="keeps all 256 directions"):
        null_space(C, 2.0, "relative")
    with pytest.raises(ConfigError, match="nullspace_mode"):
        null_space(C, 0.1, "fraction")
    alpha = make(AlphaEdit, tiny_llama, stats_cfg(tmp_path, 800), nullspace_threshold=1e6)
    before = weights(tiny_llama.model)
    with pytest.raises(ConfigError, match="nullspace_threshold=1000000.0 .absolute. keeps all"):
        alpha.apply([REQ])
    assert_untouched(tiny_llama.model, before)


# --- AlphaEdit -----------------------------------------------------------------------------------------
def test_alphaedit_update_is_the_projected_solve():
    g = torch.Generator().manual_seed(0)
    K, R, Kp = (torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g,
                dtype=torch.float64), torch.randn(4, 8, generator=g, dtype=torch.float64))
    U = torch.linalg.qr(torch.randn(8, 5, generator=g, dtype=torch.float64))[0]
    P = U @ U.T
    D = alphaedit_update(K, R, P, Kp.T @ Kp, 0.5)
    # eq. 9's normal equations, Δᵀ = (P(K₁K₁ᵀ + K_pK_pᵀ) + λI)⁻¹ P K₁ Rᵀ, and Δ lives in P's row space
    A = P @ (K.T @ K + Kp.T @ Kp) + 0.5 * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(A @ D.T, P @ K.T @ R, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(D @ P, D, rtol=1e-9, atol=1e-10)


def test_alphaedit_edit_leaves_preserved_keys_outputs_unchanged(tiny_llama, tmp_path):
    lm = tiny_llama
    stats = stats_cfg(tmp_path, 120)  # fewer keys than dimensions: P is an exact null space
    alpha = make(AlphaEdit, lm, stats, nullspace_threshold=1e-9, nullspace_mode="relative", l2=1e-2)
    memit = make(MEMIT, lm, stats, mom2_update_weight=1e-2)
    before = weights(lm.model)
    h = alpha.apply([REQ, REQ2])
    moved, kept = [], []
    for layer in LAYERS:
        d = delta(lm, before, layer)
        K0 = stats_root(lm, layer, stats)
        kept.append((d @ K0.T).norm() / (d.norm() * K0.norm()))
        moved.append(d.norm())
    alpha.restore(h)
    assert_untouched(lm.model, before)
    h = memit.apply([REQ, REQ2])
    memit_moved = [(delta(lm, before, x) @ stats_root(lm, x, stats).T).norm()
                   / (delta(lm, before, x).norm() * stats_root(lm, x, stats).norm()) for x in LAYERS]
    memit.restore(h)
    assert min(moved) > 1e-3  # it edits
    assert max(kept) < 1e-4  # ... and the preserved keys' outputs W k₀ stay (float32 rounding of W only)
    assert min(memit_moved) > 100 * max(kept)  # MEMIT's update does touch them
    assert h.info["final_z_error"] < h.info["layers"][0]["z_error"]


def stats_root(lm, layer: int, stats: dict) -> torch.Tensor:
    """Rows S with SᵀS = E[k₀k₀ᵀ] over the statistics' keys: ‖ΔW Sᵀ‖² = mean ‖ΔW k₀‖², ‖S‖² = mean ‖k₀‖²."""
    C = second_moment(lm.model, lm.tokenizer, lm.spec, [layer], stats)[layer].double()
    evals, evecs = torch.linalg.eigh(C)  # a square root spans the same keys: C = KᵀK/N ⇒ range(C) = range(Kᵀ)
    return (evecs * evals.clamp(min=0).sqrt()).T


def test_accumulated_keys_protect_earlier_edits_and_restore_exactly(tiny_llama, tmp_path):
    lm = tiny_llama
    stats = stats_cfg(tmp_path, 120)
    kw = dict(nullspace_threshold=1e-9, nullspace_mode="relative", l2=1e-3)
    touched = {}
    for accumulate in (True, False):
        alpha = make(AlphaEdit, lm, stats, accumulate_keys=accumulate, **kw)
        before = weights(lm.model)
        h1 = alpha.apply([REQ])
        after1, state1 = weights(lm.model), alpha.keys.state()
        k1 = {x: compute_keys(lm.model, lm.tokenizer, lm.spec, x, [REQ], alpha.templates(),
                              groups=alpha.key_groups) for x in LAYERS}
        if accumulate:
            assert alpha.keys.count == 1
            for x in LAYERS:  # K_pK_pᵀ is the first edit's keys, on the model after its edit
                torch.testing.assert_close(alpha.keys.get(x, 256), k1[x].double().T @ k1[x].double())
        h2 = alpha.apply([REQ2])
        touched[accumulate] = max((delta(lm, after1, x) @ k1[x].double().T).norm().item() for x in LAYERS)
        alpha.restore(h2)
        assert_untouched(lm.model, after1)
        assert alpha.keys.count == state1[1] and all(torch.equal(alpha.keys.state()[0][x], state1[0][x])
                                                     for x in state1[0])
        alpha.restore(h1)
        assert_untouched(lm.model, before)
        assert alpha.keys.count == 0
    assert touched[True] < 0.5 * touched[False]  # the K_p term keeps the second edit off the first's keys


def test_accumulated_keys_state_is_a_snapshot():
    acc = AccumulatedKeys()
    acc.add(0, torch.ones(2, 3))
    state = acc.state()
    acc.add(0, torch.ones(1, 3))
    assert acc.get(0, 3)[0, 0] == 3 and state[0][0][0, 0] == 2
    acc.load(state)
    assert acc.get(0, 3)[0, 0] == 2 and acc.get(5, 3).abs().sum() == 0


# --- EMMET -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 1000.0])
def test_emmet_with_one_edit_equals_rome_closed_form(alpha):
    K, R, C = random_problem(1)
    W = torch.randn(6, 10, dtype=torch.float64)
    k = K[0]
    rome = rank_one_update(W, k, W @ k + R[0], CovarianceSolver(C).solve(k))  # ROME eq. 2, k* in both places
    torch.testing.assert_close(emmet_update(K, R, CovarianceSolver(alpha * C), 0.1), rome, rtol=1e-9, atol=1e-12)


def test_emmet_batch_meets_every_constraint_and_minimizes_the_c_norm():
    K, R, C = random_problem(3)
    D = emmet_update(K, R, CovarianceSolver(C), 0.0)
    torch.testing.assert_close(D @ K.T, R.T, rtol=1e-9, atol=1e-10)  # ΔW kᵢ = rᵢ exactly with λ = 0
    # any other solution of the constraints, D + N with N K = 0, has a larger tr(Δ C Δᵀ)
    N = torch.randn(6, 10, dtype=torch.float64) @ (torch.eye(10, dtype=torch.float64) - K.T @ torch.linalg.pinv(K.T))
    assert torch.trace(D @ C @ D.T) < torch.trace((D + N) @ C @ (D + N).T)
    Dl = emmet_update(K, R, CovarianceSolver(C), 0.5)
    torch.testing.assert_close(Dl, R.T @ torch.linalg.solve(K @ torch.linalg.solve(C, K.T) + 0.5 * torch.eye(3,
                               dtype=torch.float64), torch.linalg.solve(C, K.T).T))


def test_emmet_one_layer_edit_is_rank_one_along_c_inv_k(tiny_llama, tmp_path):
    lm = tiny_llama
    emmet = make(EMMET, lm, stats_cfg(tmp_path, 800), layers=[1], mom2_update_weight=50.0)
    k = compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ], emmet.templates(), groups=emmet.key_groups)[0]
    u = CovarianceSolver(emmet.mom2()[1]).solve(k.double())
    before = weights(lm.model)
    h = emmet.apply([REQ])
    d = delta(lm, before, 1)
    assert d.norm() > 1e-3
    residual = d - torch.outer(d @ u, u) / (u @ u)
    assert residual.norm() < 1e-4 * d.norm()
    emmet.restore(h)
    assert_untouched(lm.model, before)


# --- r-ROME --------------------------------------------------------------------------------------------
def test_r_rome_config_is_rome_with_the_mean_key():
    rome = compose("edit", ["model=tiny_llama", "method=rome", "paths.output_dir=/tmp/x"]).method
    r_rome = compose("edit", ["model=tiny_llama", "method=r_rome", "paths.output_dir=/tmp/x"]).method
    diff = {k for k in set(rome) | set(r_rome) if rome.get(k) != r_rome.get(k)}
    assert diff == {"name", "constraint_key"} and r_rome.constraint_key == "mean"


def test_r_rome_matches_hand_computed_rank_one_update(tiny_llama, tmp_path, monkeypatch):
    lm = tiny_llama
    d_out = lm.spec.hidden_size
    fixed = torch.randn(1, d_out, generator=torch.Generator().manual_seed(3)) * 0.5

    def fake_values(model, tok, spec, reqs, *a, **k):  # a known δ: the test checks the algebra around it
        return ValueResult(fixed.clone(), torch.zeros(1, d_out), torch.zeros(1), torch.zeros(1), [0])

    monkeypatch.setattr(rome_mod, "optimize_values", fake_values)
    stats = stats_cfg(tmp_path, 800)
    ups = {}
    for key in ("mean", "plain"):
        rome = ROME(model=lm.model, tokenizer=lm.tokenizer, spec=lm.spec, layer=1, stats=stats,
                    context_template_length_params=[[4, 3]], constraint_key=key)
        before = weights(lm.model)
        h = rome.apply([REQ])
        ups[key] = delta(lm, before, 1)
        rome.restore(h)
    templates = rome.templates()
    keys = template_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ], templates)[0].double()
    k_star, k_plain = keys.mean(0), keys[templates.index("{}")]
    C = second_moment(lm.model, lm.tokenizer, lm.spec, [1], stats)[1].double()
    u = torch.linalg.solve(C, k_star)
    d = fixed[0].double()
    hand = torch.outer(d, u) / (u @ k_star)  # r-ROME: Λ (C⁻¹k*)ᵀ, Λ = δ / (k*ᵀC⁻¹k*)
    torch.testing.assert_close(ups["mean"], hand, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ups["mean"] @ k_star, d, rtol=1e-4, atol=1e-5)  # W' k* = W k* + δ
    # ROME differs only in the denominator's key (same δ, same direction C⁻¹k*)
    torch.testing.assert_close(ups["plain"], hand * (u @ k_star) / (u @ k_plain), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ups["plain"], ups["mean"], rtol=1e-3)


# --- the lifelong protocol --------------------------------------------------------------------------------
def test_lifelong_rows_in_sequential_mode(tmp_path, tiny_llama):
    cfg = edit_cfg(tmp_path, "method=memit", "method.v_num_grad_steps=3", "edit.mode=sequential",
                   "edit.lifelong.sample=2", "edit.lifelong.perplexity.n_tokens=300",
                   f"stats.cache_dir={tmp_path}/cache", "stats.n_samples=800", "stats.seq_len=60")
    summary = run_edit(cfg)
    rows = summary["lifelong"]["rows"]
    assert [r["n_edits"] for r in rows] == [0, 1, 2, 3] and rows[0]["delta_norm_total"] == 0
    assert [r["n_scored"] for r in rows][-1] == 2 and "es" in rows[-1] and rows[-1]["perplexity"] > 1
    assert set(rows[-1]["delta_norm"]) == {tiny_llama.spec.weight_name("mlp_out", x) for x in LAYERS}
    assert rows[-1]["delta_norm_total"] > 0 and summary["lifelong"]["collapsed"] is None
    for k in ("es", "ps", "ns"):  # each rate with its bootstrap interval over the scored records
        lo, hi = rows[-1]["ci"][k]
        assert lo <= rows[-1][k] <= hi
    lines = (tmp_path / "lifelong.jsonl").read_text().splitlines()
    assert [json.loads(x)["n_edits"] for x in lines] == [0, 1, 2, 3]
    assert (tmp_path / "lifelong.png").stat().st_size > 0


def test_collapse_stops_the_run_and_writes_the_summary_so_far(tmp_path, monkeypatch):
    values = iter([10.0, 12.0, 500.0, 600.0])
    monkeypatch.setattr(lifelong_mod, "perplexity", lambda *a, **k: next(values))
    cfg = edit_cfg(tmp_path, "method=memit", "method.v_num_grad_steps=2", "edit.mode=sequential",
                   f"stats.cache_dir={tmp_path}/cache", "stats.n_samples=800", "stats.seq_len=60")
    with pytest.raises(Collapsed, match=r"collapse after 2 edits: WikiText-2 perplexity 500.0 > 10 x its start 10.0"):
        run_edit(cfg)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["timing"]["n_edits"] == 2 and summary["final"]["n_records"] == 2
    assert summary["lifelong"]["collapsed"].startswith("collapse after 2 edits")
    assert len((tmp_path / "records.jsonl").read_text().splitlines()) == 2
    with pytest.raises(Collapsed, match="the run in .* ended with a collapse after 2 edits"):  # resume: as it ended
        run_edit(edit_cfg(tmp_path, "method=memit", "method.v_num_grad_steps=2", "edit.mode=sequential",
                          f"stats.cache_dir={tmp_path}/cache", "stats.n_samples=800", "stats.seq_len=60",
                          "edit.resume=true"))
    values = iter([10.0, 12.0, 500.0])
    with pytest.raises(SystemExit) as e:  # the entry point: one line, exit 2, the files stay
        cli(run_edit, edit_cfg(tmp_path / "b", "method=memit", "method.v_num_grad_steps=2", "edit.mode=sequential",
                               f"stats.cache_dir={tmp_path}/cache", "stats.n_samples=800", "stats.seq_len=60"))
    assert e.value.code == 2 and (tmp_path / "b" / "summary.json").is_file()


def test_bad_lifelong_config_is_one_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="collapse_factor"):
        lifelong_mod.LifelongConfig.from_any({"collapse_factor": 0.5, "perplexity": {"corpus": "x"}})
    with pytest.raises(ConfigError, match="unknown field"):
        lifelong_mod.LifelongConfig.from_any({"evry": 2})
