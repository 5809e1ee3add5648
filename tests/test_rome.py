"""ROME (methods/rome.py) and its parts: rank-one algebra, keys, values (fast == full), failures."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kedit_pl.config import compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import EditFailed
from kedit_pl.kv.context import context_templates, generate_templates
from kedit_pl.kv.keys import compute_keys, template_keys
from kedit_pl.kv.values import optimize_values
from kedit_pl.methods.rome import ROME, CovarianceSolver, rank_one_update
from kedit_pl.models.load import LoadedModel
from kedit_pl.models.spec import ModelSpec, linear_weight
from kedit_pl.models.tiny import tiny_model
from kedit_pl.pipeline import build_method
from kedit_pl.tokens import encode_targets, label_logprobs

REQ = EditRequest(case_id="t0", subject="Danielle Darrieux", prompt="The mother tongue of {} is",
                  target_true="French", target_new="English",
                  paraphrases=("Danielle Darrieux, a native speaker of",),
                  neighborhood=("The mother tongue of Léon Blum is",))
REQ2 = EditRequest(case_id="t1", subject="Toko Yasuda", prompt="{} plays the instrument", target_true="guitar",
                   target_new="piano")
TEMPLATES = ["{}", "The day. {}", "Because of it. {}"]
TEXT = "Editing a single fact in a language model should leave every other fact where it was. " * 40


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stats(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return dict(corpus=str(p), n_samples=1500, seq_len=100, batch_size=5, dtype="float64",
                cache_dir=str(tmp_path / "cache"), progress=False)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def mean_nll(lm, prompt: str, target: str) -> float:
    tb = encode_targets(lm.tokenizer, [prompt], [target])
    with torch.no_grad():
        lp = label_logprobs(lm.model(input_ids=tb.input_ids, attention_mask=tb.attention_mask).logits, tb.labels)
    return float(-(lp.sum() / tb.target_mask.sum()))


# --- rank-one algebra (eq. 2) -----------------------------------------------------------------------------
@pytest.mark.parametrize("with_bias", [False, True])
def test_rank_one_update_hits_value(with_bias):
    g = torch.Generator().manual_seed(0)
    W, k, v = torch.randn(6, 10, generator=g), torch.randn(10, generator=g), torch.randn(6, generator=g)
    A = torch.randn(10, 40, generator=g, dtype=torch.float64)
    C = A @ A.T / 40
    b = torch.randn(6, generator=g) if with_bias else None
    u = CovarianceSolver(C).solve(k)
    torch.testing.assert_close(C @ u, k.double(), rtol=1e-9, atol=1e-9)
    dW = rank_one_update(W, k, v, u, b)
    assert dW.dtype == torch.float64 and torch.linalg.matrix_rank(dW) == 1
    out = (W.double() + dW) @ k.double() + (b.double() if b is not None else 0)
    torch.testing.assert_close(out, v.double(), rtol=1e-10, atol=1e-10)
    # keys orthogonal to k* in the C⁻¹ metric are untouched (the least-squares property of eq. 2)
    x = torch.randn(10, dtype=torch.float64, generator=g)
    x -= (u @ x) / (u @ k.double()) * k.double()
    torch.testing.assert_close(dW @ x, torch.zeros(6, dtype=torch.float64), atol=1e-10, rtol=0)
    # mom2_update_weight softens the edit: W'k* moves only part of the way to v*
    bias = b.double() if b is not None else 0
    soft = (W.double() + rank_one_update(W, k, v, u, b, mom2_update_weight=float(u @ k.double()))) @ k.double() + bias
    base = W.double() @ k.double() + bias
    torch.testing.assert_close(soft - base, (v.double() - base) / 2)


# --- context templates ------------------------------------------------------------------------------------
def test_context_templates_seeded_and_cached(tiny_llama, tmp_path):
    lm = tiny_llama
    a = generate_templates(lm.model, lm.tokenizer, [(4, 5)], seed=3)
    assert a == generate_templates(lm.model, lm.tokenizer, [(4, 5)], seed=3)
    assert a[0] == "{}" and len(a) == 6
    assert all(t.count("{}") == 1 and t.endswith("{}") for t in a)
    assert all(t.endswith(". {}") for t in a[1:])
    cached = context_templates(lm.model, lm.tokenizer, "tiny:x", [(4, 5)], seed=3, cache_dir=tmp_path)
    assert cached == a and len(list(tmp_path.glob("context_templates_*.json"))) == 1


# --- keys -------------------------------------------------------------------------------------------------
def test_keys_batched_equal_single(tiny_gpt2):
    lm = tiny_gpt2
    both = compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ, REQ2], TEMPLATES, batch_size=4)
    for i, req in enumerate([REQ, REQ2]):
        one = torch.stack([compute_keys(lm.model, lm.tokenizer, lm.spec, 1, [req], [t])[0] for t in TEMPLATES]).mean(0)
        torch.testing.assert_close(both[i], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_value_pass_reads_the_template_keys(tiny_gpt2, fast):
    """ROME takes k(x_j + s) from the value optimization's caching pass instead of a separate keys pass."""
    lm = tiny_gpt2
    res = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ, REQ2], TEMPLATES, 1, steps=1, fast=fast)
    ref = template_keys(lm.model, lm.tokenizer, lm.spec, 1, [REQ, REQ2], TEMPLATES)
    assert res.keys.shape == ref.shape == (2, len(TEMPLATES), ref.shape[-1])
    torch.testing.assert_close(res.keys, ref, rtol=1e-5, atol=1e-6)


# --- values: fast path == full forward --------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("insert", ["mlp_out", "layer"])
def test_fast_path_equals_full_forward(request, which, insert):
    lm = request.getfixturevalue(which)
    kw = dict(insert=insert, steps=6, lr=0.1)
    full = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ, REQ2], TEMPLATES, 1, fast=False, **kw)
    fast = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ, REQ2], TEMPLATES, 1, fast=True, **kw)
    assert full.delta.abs().max() > 0
    torch.testing.assert_close(fast.delta, full.delta, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(fast.nll, full.nll, rtol=1e-4, atol=1e-6)
    # requests do not interact: batched == one at a time; grouping by max_rows changes nothing
    alone = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ2], TEMPLATES, 1, fast=True, **kw)
    torch.testing.assert_close(fast.delta[1], alone.delta[0], rtol=1e-4, atol=1e-6)
    grouped = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ, REQ2], TEMPLATES, 1, max_rows=4, **kw)
    torch.testing.assert_close(grouped.delta, fast.delta, rtol=1e-4, atol=1e-6)


def test_fast_path_skips_lower_layers_and_prefix_tokens(tiny_llama):
    lm = tiny_llama
    low_calls, top_widths = [], []
    low = lm.spec.module(lm.model, "attn", 0)
    top = lm.spec.module(lm.model, "layer", 3)
    hooks = [low.register_forward_hook(lambda *a: low_calls.append(1)),
             top.register_forward_hook(lambda _m, _a, out: top_widths.append(out.shape[1]))]
    try:
        optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ], TEMPLATES, 2, steps=5, stop_loss=0.0, fast=True)
        fast_width = top_widths[-1]  # the last forward runs the longest rows (groups go by length)
        # only the caching passes run layer 0 (the prefix, in groups of similar length, then the suffix): as many
        # with 2 steps as with 5, so no optimization step runs it
        caching = len(low_calls)
        low_calls.clear()
        optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ], TEMPLATES, 2, steps=2, stop_loss=0.0, fast=True)
        assert len(low_calls) == caching <= 1 + len(TEMPLATES) + 1
        low_calls.clear()
        optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ], TEMPLATES, 2, steps=5, stop_loss=0.0, fast=False)
        assert len(low_calls) == 6
        # upper layers only see the suffix: subject's last token, " is", the target minus its last token (bytes)
        assert fast_width == 1 + len(" is") + len(" English") - 1 < top_widths[-1]
    finally:
        for h in hooks:
            h.remove()
    assert all("forward" not in m.__dict__ for m in lm.model.modules())


# --- ROME end to end --------------------------------------------------------------------------------------
WORDS = ("the of is a in and to mother tongue language native speaker Danielle Darrieux French English Toko Yasuda "
         "plays instrument guitar piano Rome capital Italy Peru city because therefore I you it was . ,").split()
REQ_W = EditRequest(case_id="w0", subject="Toko Yasuda", prompt="{} plays the instrument", target_true="piano",
                    target_new="guitar")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer: every word (and target) is one token, so a random tiny model can be steered."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")


def word_lm(model_type: str) -> LoadedModel:
    """A seeded tiny model (init std 0.1: the default 0.02 leaves logits too flat to edit) on word tokens."""
    cfg = compose("edit", [f"model=tiny_{model_type}", "paths.output_dir=/tmp"]).model
    tiny = {**dict(cfg.tiny), "initializer_range": 0.1}
    tok = word_tokenizer()
    model = tiny_model(tiny, tok).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, tok, ModelSpec.from_config(cfg))


def make_rome(lm, stats, **kw) -> ROME:
    base = dict(layer=lm.spec.method_defaults["rome"]["layer"], context_template_length_params=[[4, 5]], stats=stats)
    return ROME(model=lm.model, tokenizer=lm.tokenizer, spec=lm.spec, **{**base, **kw})


@pytest.mark.parametrize("model_type,constraint_key", [("llama", "plain"), ("gpt2", "plain"), ("llama", "mean")])
def test_rome_drives_es_to_one_and_restores_exactly(model_type, constraint_key, tmp_path):
    lm = word_lm(model_type)
    (tmp_path / "words.txt").write_text(" ".join(WORDS * 30))
    stats = dict(corpus=str(tmp_path / "words.txt"), n_samples=800, seq_len=50, batch_size=4,
                 cache_dir=str(tmp_path), progress=False)
    # tiny random models need a larger trust region than ROME's defaults for a real model
    hp = dict(v_lr=1.0, clamp_norm_factor=50.0, v_weight_decay=0.0, v_num_grad_steps=40)
    rome = make_rome(lm, stats, constraint_key=constraint_key, **hp)
    before = weights(lm.model)
    req = REQ_W  # edit towards the target the unedited model does not prefer (ES = 0 before)
    if mean_nll(lm, req.rewrite, req.target_new) < mean_nll(lm, req.rewrite, req.target_true):
        req = dataclasses.replace(req, target_new=req.target_true, target_true=req.target_new)
    templates = rome.templates()
    keys = template_keys(lm.model, lm.tokenizer, lm.spec, rome.layer, [req], templates)[0]
    k = keys.mean(0) if constraint_key == "mean" else keys[templates.index("{}")]
    res = optimize_values(lm.model, lm.tokenizer, lm.spec, [req], templates, rome.layer, steps=40, lr=1.0,
                          clamp_norm_factor=50.0, weight_decay=0.0)
    handle = rome.apply([req])
    assert mean_nll(lm, req.rewrite, req.target_new) < mean_nll(lm, req.rewrite, req.target_true)  # ES 1
    # the edited projection maps the constrained key k to v = W k + b + δ (keys at the edit layer do not change)
    module = lm.spec.module(lm.model, "mlp_out", rome.layer)
    torch.testing.assert_close(template_keys(lm.model, lm.tokenizer, lm.spec, rome.layer, [req], templates)[0], keys)
    name = lm.spec.weight_name("mlp_out", rome.layer)
    W0 = before[name].t() if type(module).__name__ == "Conv1D" else before[name]
    with torch.no_grad():
        moved = module(k) - (k @ W0.T + (module.bias if module.bias is not None else 0))
    torch.testing.assert_close(moved, res.delta[0], rtol=1e-3, atol=1e-3)
    rome.restore(handle)
    assert_untouched(lm.model, before)


def test_rome_from_hydra_config(tiny_llama, tmp_path):
    cfg = compose("edit", ["model=tiny_llama", "method=rome", f"paths.output_dir={tmp_path}",
                           f"paths.cache_dir={tmp_path}"])
    rome = build_method(cfg, tiny_llama)
    assert isinstance(rome, ROME) and rome.layer == 1 and rome.stats.cache_dir == str(tmp_path / "stats")
    assert rome.edited_parameters([REQ]) == ["model.layers.1.mlp.down_proj.weight"]


# --- failures leave the model untouched ---------------------------------------------------------------------
def test_subject_at_end_of_prompt_fails_cleanly(tiny_llama, stats):
    rome = make_rome(tiny_llama, stats)
    before = weights(tiny_llama.model)
    bad = EditRequest(case_id="end", subject="Paris", prompt="The capital of France is {}", target_true="x",
                      target_new="y")
    with pytest.raises(EditFailed, match="ends with the subject"):
        rome.apply([REQ, bad])
    assert_untouched(tiny_llama.model, before)


def test_nan_loss_fails_cleanly(tiny_llama, stats):
    lm = tiny_llama
    rome = make_rome(lm, stats)
    rome.prepare()  # templates and C from the healthy model
    before = weights(lm.model)
    top = lm.spec.module(lm.model, "layer", lm.spec.n_layers - 1)
    h = top.register_forward_hook(lambda _m, _a, out: out * float("nan"))
    try:
        with pytest.raises(EditFailed, match="non-finite loss"):
            rome.apply([REQ])
    finally:
        h.remove()
    assert_untouched(lm.model, before)


def merging_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace-split BPE over letters with one merge ("a", "b") -> "ab": "a" + "b..." tokenizes differently."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    vocab = {ch: i for i, ch in enumerate(["<unk>", "<pad>", "ab"] + letters + list(".,{}"))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<pad>")


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_subject_tokenizing_differently_fails_cleanly(method, monkeypatch):
    from kedit_pl.methods.memit import MEMIT
    import kedit_pl.kv.values as values_mod

    tok = merging_tokenizer()
    model = tiny_model({"model_type": "llama", "seed": 0, "hidden_size": 32, "num_hidden_layers": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64,
                        "max_position_embeddings": 64}, tok).eval()
    spec = ModelSpec.from_config(compose("edit", ["model=tiny_llama", "paths.output_dir=/tmp"]).model)
    spec = dataclasses.replace(spec, n_layers=2, hidden_size=32)
    common = dict(model=model, tokenizer=tok, spec=spec, mom2_adjustment=False,
                  context_template_length_params=[[3, 5]], cache_dir=None)
    editor = ROME(layer=0, **common) if method == "rome" else MEMIT(layers=[0, 1], **common)
    editor.prepare()
    before = weights(model)
    # a batch fails as a whole before any value optimization, naming the bad case
    monkeypatch.setattr(values_mod, "_optimize_group", lambda *a, **k: pytest.fail("optimized before checking"))
    good = EditRequest(case_id="good", subject="Cd", prompt="{} plays", target_true="x", target_new="y")
    req = EditRequest(case_id="merge", subject="Bra", prompt="{}bz plays", target_true="x", target_new="y")
    with pytest.raises(EditFailed, match="case_id=merge.*tokenizes differently"):
        editor.apply([good, req])
    assert_untouched(model, before)
    # edit.py asks the same question of every record up front, to skip such records before the first edit
    assert editor.request_problem(good) is None
    assert "tokenizes differently" in editor.request_problem(req)
    assert linear_weight(spec.module(model, "mlp_out", 0)).shape == (32, 64)
