"""MEMIT (methods/memit.py): eq. 14 algebra, batched z, closed form on one layer, ES and exact restore."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kedit_pl.config import compose
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.kv.context import template_groups
from kedit_pl.data.requests import EditRequest
from kedit_pl.kv.keys import LayerKeys, average_keys, compute_keys, template_keys
from kedit_pl.methods.memit import MEMIT, block_outputs, memit_update
from kedit_pl.methods.rome import CovarianceSolver, rank_one_update
import kedit_pl.methods.memit as memit_mod
from kedit_pl.pipeline import build_method
from tests.test_rome import (REQ, REQ2, REQ_W, WORDS, assert_untouched, mean_nll,  # noqa: F401
                             weights, word_lm)

pytestmark = pytest.mark.usefixtures("one_thread")


def random_problem(n: int, d_k: int = 10, d_out: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    K = torch.randn(n, d_k, generator=g, dtype=torch.float64)
    R = torch.randn(n, d_out, generator=g, dtype=torch.float64)
    A = torch.randn(d_k, 4 * d_k, generator=g, dtype=torch.float64)
    return K, R, A @ A.T / (4 * d_k)


@pytest.fixture
def stats(tmp_path):
    (tmp_path / "words.txt").write_text(" ".join(WORDS * 30))
    return dict(corpus=str(tmp_path / "words.txt"), n_samples=800, seq_len=50, batch_size=4,
                cache_dir=str(tmp_path), progress=False)


def make_memit(lm, stats, **kw) -> MEMIT:
    base = dict(layers=lm.spec.method_defaults["memit"]["layers"], context_template_length_params=[[4, 5]],
                stats=stats)
    return MEMIT(model=lm.model, tokenizer=lm.tokenizer, spec=lm.spec, **{**base, **kw})


# --- eq. 14 algebra ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 20])
def test_update_solves_regularized_least_squares(n):
    K, R, C = random_problem(n)
    lam = 0.7
    D = memit_update(K, R, C, lam)
    assert D.dtype == torch.float64 and D.shape == (6, 10)
    # normal equations of argmin ‖ΔK − R‖² + λ tr(Δ C Δᵀ): Δ(λC + KKᵀ) = R Kᵀ (keys as columns)
    torch.testing.assert_close(D @ (lam * C + K.T @ K), R.T @ K, rtol=1e-9, atol=1e-9)
    # the same minimizer from a plain least-squares solve of the stacked system [K, √λ L] (C = L Lᵀ)
    L = torch.linalg.cholesky(C)
    A = torch.cat([K.T, lam ** 0.5 * L], 1)  # (d_k, n + d_k)
    B = torch.cat([R.T, torch.zeros(6, 10, dtype=torch.float64)], 1)
    direct = torch.linalg.lstsq(A.T, B.T).solution.T
    torch.testing.assert_close(D, direct, rtol=1e-8, atol=1e-10)


def test_one_key_equals_rome_rank_one_update():
    K, R, C = random_problem(1)
    W = torch.randn(6, 10, dtype=torch.float64)
    k, v = K[0], W @ K[0] + R[0]
    rome = rank_one_update(W, k, v, CovarianceSolver(C).solve(k), mom2_update_weight=2.5)
    torch.testing.assert_close(memit_update(K, R, C, 2.5), rome, rtol=1e-9, atol=1e-12)


# --- batched z == one at a time ---------------------------------------------------------------------------
def test_batched_targets_equal_single(tiny_llama, stats):
    lm = tiny_llama
    memit = make_memit(lm, stats, v_num_grad_steps=6, v_lr=0.1)
    both = memit.compute_targets([REQ, REQ2])
    memit.z_batch_size = 1  # two groups of one request
    grouped = memit.compute_targets([REQ, REQ2])
    alone = [memit.compute_targets([r]).target[0] for r in (REQ, REQ2)]
    assert both.delta.abs().max() > 0
    torch.testing.assert_close(grouped.target, both.target, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(alone), both.target, rtol=1e-4, atol=1e-6)
    # z lives at the top layer's block output: z − δ is the unedited residual stream there
    h = block_outputs(lm.model, lm.tokenizer, lm.spec, memit.layer, [REQ, REQ2])
    torch.testing.assert_close(both.v_init, h, rtol=1e-4, atol=1e-5)


# --- keys: how the context templates are averaged ---------------------------------------------------------
def test_key_average_groups_and_uniform(tiny_llama, stats):
    lm = tiny_llama
    memit = make_memit(lm, stats, context_template_length_params=[[4, 5], [6, 5]])
    templates = memit.templates()
    assert template_groups(memit.lengths) == memit.key_groups == [1, 5, 5] and len(templates) == 11
    tk = template_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ, REQ2], templates)
    grouped = compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ, REQ2], templates, groups=memit.key_groups)
    torch.testing.assert_close(grouped, (tk[:, 0] + tk[:, 1:6].mean(1) + tk[:, 6:].mean(1)) / 3)
    uniform = compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ, REQ2], templates)
    torch.testing.assert_close(uniform, tk.mean(1))
    assert make_memit(lm, stats, key_average="uniform").key_groups is None
    with pytest.raises(ValueError, match="partition"):
        compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ], templates, groups=[1, 5])


# --- keys layer after layer from kept block inputs (LayerKeys) == full passes --------------------------------
REQ3 = EditRequest(case_id="t2", subject="Rome", prompt="{} is the capital of", target_true="Italy", target_new="Peru")


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gpt2"])
def test_layer_keys_equal_full_passes_while_layers_change(arch, stats, request):
    """MEMIT Algorithm 1 reads k_i at l after the layers below l were updated (eq. 14 per layer): LayerKeys keeps
    the lowest changing block's inputs and must give what the full passes give, chunk boundaries included."""
    lm = request.getfixturevalue(arch)
    memit = make_memit(lm, stats, context_template_length_params=[[4, 3]])
    templates, reqs, layers = memit.templates(), [REQ, REQ2, REQ3], [0, 1]
    top = layers[-1]
    lk = LayerKeys(lm.model, lm.tokenizer, lm.spec, reqs, templates, batch_size=5)  # chunks cut requests apart
    assert len(lk.chunks) > 2
    # two DDP ranks' parts: the same row batches, round-robin, so their rows put together are one process's, exactly
    parts = [LayerKeys(lm.model, lm.tokenizer, lm.spec, reqs, templates, batch_size=5, part=(r, 2)) for r in (0, 1)]
    assert sorted(parts[0].rows + parts[1].rows) == lk.rows == list(range(len(reqs) * len(templates)))
    with pytest.raises(ValueError, match="every row"):
        parts[0].keys(0)
    before = weights(lm.model)
    g = torch.Generator().manual_seed(0)
    try:
        for layer in layers:
            full_k = compute_keys(lm.model, lm.tokenizer, lm.spec, layer, reqs, templates, groups=memit.key_groups)
            torch.testing.assert_close(lk.keys(layer, memit.key_groups), full_k, rtol=1e-5, atol=1e-6)
            rows = torch.empty(len(lk.rows), full_k.shape[1])
            for part in parts:
                rows[part.rows] = part.row_keys(layer)
            assert torch.equal(average_keys(rows.view(len(reqs), len(templates), -1), memit.key_groups),
                               lk.keys(layer, memit.key_groups))
            mlp = lm.spec.module_name("mlp_out", layer)
            full_h, full_m = block_outputs(lm.model, lm.tokenizer, lm.spec, top, reqs, also=[mlp])
            h, m = lk.outputs(top, [mlp])
            torch.testing.assert_close(h, full_h, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(m, full_m, rtol=1e-5, atol=1e-6)
            joined = torch.empty_like(h)
            for part in parts:
                joined[part.plain_requests] = part.outputs(top, [mlp])[0]
            assert torch.equal(joined, h)
            W = dict(lm.model.named_parameters())[lm.spec.weight_name("mlp_out", layer)]
            with torch.no_grad():  # an update the next reads must see
                W.add_(0.3 * W.abs().mean() * torch.randn(W.shape, generator=g))
        torch.testing.assert_close(lk.outputs(top), block_outputs(lm.model, lm.tokenizer, lm.spec, top, reqs),
                                   rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="reads must go up"):
            lk.keys(0)
        with torch.no_grad():
            dict(lm.model.named_parameters())[lm.spec.weight_name("mlp_out", 0)].mul_(1.01)
        with pytest.raises(ValueError, match="changed since"):
            lk.keys(top)
    finally:
        with torch.no_grad():
            for n, p in lm.model.named_parameters():
                p.copy_(before[n])


def test_edit_with_layer_keys_equals_full_passes(tiny_llama, stats, monkeypatch):
    """The whole MEMIT edit (z, then the layers' keys, outputs and eq. 14 solves) with the kept-input reads gives
    the update of the reference full passes."""
    lm = tiny_llama
    memit = make_memit(lm, stats, v_num_grad_steps=4, z_cache=False)
    memit.prepare()
    reqs = [REQ, REQ2, REQ3]
    names = memit.edited_parameters(reqs)

    def edit() -> dict[str, torch.Tensor]:
        before = weights(lm.model)
        handle = memit.apply(reqs)
        delta = {n: dict(lm.model.named_parameters())[n].detach() - before[n] for n in names}
        memit.restore(handle)
        assert_untouched(lm.model, before)
        return delta

    fast = edit()
    init = memit_mod._LayerReads.__init__

    def reference(self, *a, **k):
        init(self, *a, **k)
        self.fast = False

    monkeypatch.setattr(memit_mod._LayerReads, "__init__", reference)
    full = edit()
    for n in names:
        assert fast[n].abs().max() > 0
        torch.testing.assert_close(fast[n], full[n], rtol=1e-4, atol=1e-4 * full[n].abs().max().item())


# --- one edit on one layer: the closed form -------------------------------------------------------------
def test_one_layer_edit_is_closed_form(tiny_llama, stats):
    lm = tiny_llama
    memit = make_memit(lm, stats, layers=[1], v_num_grad_steps=5, mom2_update_weight=50.0)
    memit.prepare()
    before = weights(lm.model)
    templates = memit.templates()
    tk = template_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ], templates)[0].double()  # (T, d_k)
    plain = templates.index("{}")
    # the reference code's k: half the plain prompt's key, half the mean over the prefixed prompts
    k = (0.5 * tk[plain] + 0.5 * torch.cat([tk[:plain], tk[plain + 1:]]).mean(0))[None]
    r = memit.compute_targets([REQ]).target.double() - block_outputs(lm.model, lm.tokenizer, lm.spec, 1, [REQ])
    C = memit.mom2()[1].double()
    handle = memit.apply([REQ])
    name = memit.edited_parameters([REQ])[0]
    D = (dict(lm.model.named_parameters())[name].detach().double() - before[name].double())
    # argmin ‖Δk − r‖² + λ tr(Δ C Δᵀ), solved directly as a stacked least-squares problem
    L = torch.linalg.cholesky(C)
    A = torch.cat([k.T, 50.0 ** 0.5 * L], 1)
    B = torch.cat([r.T, torch.zeros(r.shape[1], len(C), dtype=torch.float64)], 1)
    direct = torch.linalg.lstsq(A.T, B.T, driver="gelsd").solution.T
    scale = direct.abs().max()
    assert scale > 0
    torch.testing.assert_close(D / scale, direct / scale, rtol=0, atol=1e-4)
    # normal equations Δ(λC + kkᵀ) = r kᵀ hold for the written update (up to float32 storage)
    lhs, rhs = D @ (50.0 * C + k.T @ k), r.T @ k
    assert (lhs - rhs).abs().max() <= 1e-3 * rhs.abs().max()
    memit.restore(handle)
    assert_untouched(lm.model, before)


# --- end to end: ES 100 on a few edits, exact restore -----------------------------------------------------
def test_memit_edits_several_facts_and_restores_exactly(stats):
    lm = word_lm("llama")
    # tiny random models need a larger trust region (and weaker C₀ prior) than a real model
    memit = make_memit(lm, stats, v_lr=1.0, clamp_norm_factor=50.0, v_weight_decay=0.0, v_num_grad_steps=40,
                       mom2_update_weight=1.0)
    reqs = []
    for i, (subject, prompt) in enumerate([("Toko Yasuda", "{} plays the instrument"),
                                           ("Danielle Darrieux", "The mother tongue of {} is"),
                                           ("Rome", "{} is the capital of")]):
        req = dataclasses.replace(REQ_W, case_id=f"w{i}", subject=subject, prompt=prompt)
        if mean_nll(lm, req.rewrite, req.target_new) < mean_nll(lm, req.rewrite, req.target_true):
            req = dataclasses.replace(req, target_new=req.target_true, target_true=req.target_new)
        reqs.append(req)
    before = weights(lm.model)
    handle = memit.apply(reqs)
    assert set(handle.originals) == {lm.spec.weight_name("mlp_out", layer) for layer in memit.layers}
    for req in reqs:  # ES = 100
        assert mean_nll(lm, req.rewrite, req.target_new) < mean_nll(lm, req.rewrite, req.target_true), req.case_id
    assert handle.info["final_z_error"] < handle.info["layers"][0]["z_error"]
    memit.restore(handle)
    assert_untouched(lm.model, before)


# --- config and failures ------------------------------------------------------------------------------------
def test_memit_from_hydra_config(tiny_llama, tmp_path):
    cfg = compose("edit", ["model=tiny_llama", "method=memit", f"paths.output_dir={tmp_path}",
                           f"paths.cache_dir={tmp_path}"])
    memit = build_method(cfg, tiny_llama)
    assert isinstance(memit, MEMIT) and memit.layers == [0, 1, 2] and memit.layer == 2
    assert memit.edited_parameters([REQ]) == [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1, 2)]
    assert memit.to("cpu") is memit  # Lightning moves the module: nn.Module._apply must not be shadowed


@pytest.mark.parametrize("bad, match", [(dict(layers=[]), "layer range"), (dict(layers=[2, 1]), "increasing"),
                                        (dict(key_average="median"), "key_average"),
                                        (dict(layers=[1, 9]), "out of range"),
                                        (dict(mom2_update_weight=0.0), "mom2_update_weight")])
def test_bad_config(tiny_llama, stats, bad, match):
    with pytest.raises(ConfigError, match=match):
        make_memit(tiny_llama, stats, **bad)


def test_failure_leaves_model_untouched(tiny_llama, stats):
    memit = make_memit(tiny_llama, stats, v_num_grad_steps=2)
    before = weights(tiny_llama.model)
    bad = dataclasses.replace(REQ, case_id="end", subject="Paris", prompt="The capital of France is {}")
    with pytest.raises(EditFailed, match="ends with the subject"):
        memit.apply([REQ, bad])
    assert_untouched(tiny_llama.model, before)


def test_non_finite_update_midway_restores_all_layers(tiny_llama, stats, monkeypatch):
    memit = make_memit(tiny_llama, stats, v_num_grad_steps=2)
    memit.prepare()
    before = weights(tiny_llama.model)
    calls = []

    def second_is_nan(*args, **kwargs):  # layer 0 is written, then layer 1 gets a NaN update
        calls.append(1)
        out = memit_update(*args, **kwargs)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(memit_mod, "memit_update", second_is_nan)
    with pytest.raises(EditFailed, match="non-finite"):
        memit.apply([REQ])
    assert_untouched(tiny_llama.model, before)


# --- z cache: resume, reuse, never stale -------------------------------------------------------------------
def test_z_cache_reuses_values_and_misses_after_weights_change(tiny_llama, stats, monkeypatch):
    memit = make_memit(tiny_llama, stats, v_num_grad_steps=4, v_lr=0.1, z_batch_size=1)
    fresh = memit.compute_targets([REQ])  # fills the cache (one file per request)
    files = list((memit_mod.Path(stats["cache_dir"]) / tiny_llama.spec.name / "memit_z").rglob("*.safetensors"))
    assert len(files) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("cached value recomputed")

    monkeypatch.setattr(memit_mod, "optimize_values", no_compute)
    again = memit.compute_targets([REQ])
    assert torch.equal(again.target, fresh.target) and again.steps == fresh.steps
    assert (fresh.cached, again.cached) == (0, 1)  # reported, so timings can say what was computed
    name = memit.edited_parameters([REQ])[0]
    with torch.no_grad():  # an edited model (e.g. sequential mode) must not reuse the unedited model's z
        dict(tiny_llama.model.named_parameters())[name][0, 0] += 1e-3
    with pytest.raises(AssertionError, match="recomputed"):
        memit.compute_targets([REQ])



# --- post-normed MLP outputs (Gemma 2/3): the residual share becomes an MLP-output target through the norm ---
def _gemma_norm(d: int = 16) -> torch.nn.Module:
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm(d, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(1)))  # gain 1 + w, signs mixed
    return norm


def test_post_norm_target_reaches_a_reachable_output():
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm, g = _gemma_norm(), torch.Generator().manual_seed(0)
    m, other = torch.randn(4, 16, generator=g), 3 * torch.randn(4, 16, generator=g)
    want = norm(other)  # a normed output the norm can produce
    dm = mlp_output_targets(norm, m, want - norm(m))
    new = (m.double() + dm).float()
    torch.testing.assert_close(norm(new), want, rtol=1e-5, atol=1e-5)
    rms = lambda x: x.pow(2).mean(-1).sqrt()  # noqa: E731
    torch.testing.assert_close(rms(new), rms(m))  # m's scale is kept (N forgets it)


def test_post_norm_target_off_the_surface_is_its_nearest_point():
    """y* off N's surface: the target is the surface point nearest to y* (nearer than the point on y*'s ray, the
    target before); with gain 1 the surface is a sphere and the two agree."""
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm, g = _gemma_norm(), torch.Generator().manual_seed(2)
    m, resid = torch.randn(3, 16, generator=g), 10 * torch.randn(3, 16, generator=g)
    y_star = norm(m) + resid
    got = norm((m.double() + mlp_output_targets(norm, m, resid)).float())
    gain = norm(torch.ones(16))
    ray = gain * (y_star / gain) / (y_star / gain).pow(2).mean(-1, keepdim=True).sqrt()  # the ray's surface point
    assert ((got - y_star).norm(dim=-1) < (ray - y_star).norm(dim=-1)).all()
    for _ in range(20):  # no other surface point is nearer (random points near the answer)
        near = got / gain + 0.05 * torch.randn(3, 16, generator=g)
        other = gain * near / near.pow(2).mean(-1, keepdim=True).sqrt()
        assert ((got - y_star).norm(dim=-1) <= (other - y_star).norm(dim=-1) + 1e-4).all()
    with torch.no_grad():
        norm.weight.zero_()  # gain 1: the surface is a sphere, and the ray's point is its nearest to y*
    y_star = norm(m) + resid
    got = norm((m.double() + mlp_output_targets(norm, m, resid)).float())
    cos = torch.nn.functional.cosine_similarity(got, y_star, dim=-1)
    assert (cos > 1 - 1e-5).all(), cos
    plain = norm(m + resid)  # what adding the share to m itself (the update without the norm) gives
    assert ((got - y_star).norm(dim=-1) < (plain - y_star).norm(dim=-1)).all()


def test_post_norm_target_with_gemma_like_gains_moves_along_the_share():
    """Gains spanning four orders of magnitude (gemma3_270m's post-MLP norms) and a share r larger than the
    small-gain dims can follow: the target must still move N(m) towards y* (the ray's point dropped the large-gain
    dims and moved N(m) away from y*: MEMIT's distance to z grew layer by layer on the real model)."""
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm, g = _gemma_norm(64), torch.Generator().manual_seed(4)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, generator=g) * 4)  # gains 1-5
        norm.weight[:3] = torch.tensor([300.0, -500.0, 700.0])  # a few outlier dims
        norm.weight[3:6] = torch.tensor([-0.95, -0.99, -1.02])  # small gains
    m, resid = torch.randn(5, 64, generator=g), 40 * torch.randn(5, 64, generator=g)
    y = norm(m)
    y_star = y + resid
    got = norm((m.double() + mlp_output_targets(norm, m, resid)).float())
    assert ((got - y_star).norm(dim=-1) < resid.norm(dim=-1)).all()  # nearer to y* than N(m) was


def test_post_norm_that_is_not_rms_fails():
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.bias.fill_(0.5)
    with pytest.raises(EditFailed, match="not an invertible RMS norm"):
        mlp_output_targets(norm, torch.randn(2, 16), torch.randn(2, 16))


def test_post_norm_with_zero_gains_keeps_those_dims_and_reaches_the_rest():
    """Gemma's post-MLP norm can have gains of exactly 0 (1 + w, w = −1; gemma3_270m at layers 3 and 4): those
    outputs cannot move; they keep m, and the other dims reach a reachable target as before (this failed with
    'not an invertible RMS norm')."""
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm, g = _gemma_norm(), torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm.weight[[2, 7]] = -1.0  # gain 0 in two dims
    m, other = torch.randn(4, 16, generator=g), 3 * torch.randn(4, 16, generator=g)
    dead = torch.zeros(16, dtype=torch.bool)
    dead[[2, 7]] = True
    other = torch.where(dead, 0.0, other)  # a target reachable with those dims of m kept (and m's rms)
    other = torch.where(dead, m, other * (torch.where(dead, 0.0, m).norm(dim=-1, keepdim=True) /
                                          other.norm(dim=-1, keepdim=True)))
    want = norm(other)
    dm = mlp_output_targets(norm, m, want - norm(m) + 5.0 * torch.eye(16)[2])  # asks dim 2 to move: it cannot
    assert torch.isfinite(dm).all() and (dm[:, [2, 7]] == 0).all()
    new = (m.double() + dm).float()
    torch.testing.assert_close(norm(new), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(new.pow(2).mean(-1), m.pow(2).mean(-1))


def test_post_norm_error_names_the_real_cause():
    from kedit_pl.kv.post_norm import mlp_output_targets

    norm = _gemma_norm()
    with torch.no_grad():
        norm.weight.fill_(-1.0)
    with pytest.raises(EditFailed, match="every gain 0"):
        mlp_output_targets(norm, torch.randn(2, 16), torch.randn(2, 16))
    norm = torch.nn.LayerNorm(16)
    with torch.no_grad():
        norm.bias.fill_(0.5)
    with pytest.raises(EditFailed, match=r"relative mismatch .* >= 0.001"):
        mlp_output_targets(norm, torch.randn(2, 16), torch.randn(2, 16))
