"""Causal tracing on a tiny random-init Llama with a word-level tokenizer (fast, no downloads)."""
from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kedit_pl.locate.causal_trace import (GROUPS, CausalTracer, TraceResult, average_effects, embedding_std,
                                          suggest_edit_layers, token_groups, window_layers)
from kedit_pl.models.spec import ModelSpec

WORDS = ("The mother tongue of Danielle Darrieux is French English Paris located in capital city "
         "which the a of Toko Yasuda plays piano guitar").split()
N_LAYERS, HIDDEN = 4, 32
TEMPLATE, SUBJECT, TARGET = "The mother tongue of {} is", "Danielle Darrieux", "French"


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    vocab = {"[UNK]": 0, "[PAD]": 1, **{w: i + 2 for i, w in enumerate(dict.fromkeys(WORDS))}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def model(tok) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def spec() -> ModelSpec:
    return ModelSpec(name="tiny", family="llama", n_layers=N_LAYERS, hidden_size=HIDDEN, layer="model.layers.{}",
                     mlp="model.layers.{}.mlp", attn="model.layers.{}.self_attn", mlp_in="model.layers.{}.mlp.up_proj",
                     mlp_out="model.layers.{}.mlp.down_proj", attn_out="model.layers.{}.self_attn.o_proj",
                     embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head")


def tracer(model, tok, spec, noise: float = 1.0, **kw) -> CausalTracer:
    return CausalTracer(model, tok, spec, noise_std=noise, n_samples=kw.pop("n_samples", 4), window=kw.pop("window", 2),
                        **kw)


@pytest.fixture(scope="module")
def result(model, tok, spec) -> TraceResult:
    return tracer(model, tok, spec).trace(TEMPLATE, SUBJECT, TARGET)


def test_shapes_and_effects(result):
    T = len("The mother tongue of Danielle Darrieux is".split())
    assert result.subject_range == (4, 6)
    assert result.tokens[4:6] == ["Danielle", "Darrieux"]
    for kind in ("hidden", "mlp", "attn"):
        assert result.scores[kind].shape == (T, N_LAYERS)
        assert result.indirect_effect(kind).shape == (T, N_LAYERS)
        assert torch.isfinite(result.scores[kind]).all()
    assert math.isclose(result.total_effect, result.p_clean - result.p_corrupt)
    assert result.total_effect != 0.0


def test_prefix_restorations_have_zero_effect(result):
    s = result.subject_range[0]
    for kind in ("hidden", "mlp", "attn"):
        assert torch.equal(result.indirect_effect(kind)[:s], torch.zeros(s, N_LAYERS))


def test_restoring_all_hidden_states_recovers_clean(model, tok, spec, result):
    tr = tracer(model, tok, spec)
    ids = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    everything = {spec.module_name("layer", i): list(range(len(ids))) for i in range(N_LAYERS)}
    p = tr.patched_prob(ids, result.subject_range, result.answer_id, everything)
    assert p == pytest.approx(result.p_clean, abs=1e-6, rel=1e-5)
    # last-layer hidden state at the last token alone already fixes the output
    last = {spec.module_name("layer", N_LAYERS - 1): [len(ids) - 1]}
    assert tr.patched_prob(ids, result.subject_range, result.answer_id, last) == pytest.approx(result.p_clean, rel=1e-5)


def test_zero_noise_corrupted_equals_clean(model, tok, spec):
    r = tracer(model, tok, spec, noise=0.0).trace(TEMPLATE, SUBJECT, TARGET)
    assert r.p_corrupt == pytest.approx(r.p_clean, rel=1e-5, abs=1e-7)
    for kind in r.scores:
        assert torch.allclose(r.scores[kind], torch.full_like(r.scores[kind], r.p_clean), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("kind,batch_rows", [("hidden", 512), ("mlp", 512), ("attn", 4), ("mlp", 8)])
def test_batched_cached_grid_matches_single_runs(model, tok, spec, result, kind, batch_rows):
    tr = tracer(model, tok, spec, batch_rows=batch_rows)
    ids = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    grid = tr.trace(TEMPLATE, SUBJECT, TARGET, kinds=[kind]).scores[kind]
    for t in range(len(ids)):
        for layer in range(N_LAYERS):
            restore = {n: [t] for n in tr.names(kind, tr.restored_layers(kind, layer))}
            p = tr.patched_prob(ids, result.subject_range, result.answer_id, restore)
            assert grid[t, layer].item() == pytest.approx(p, rel=1e-4, abs=1e-7), (t, layer)


def test_predicted_answer_and_require_correct(model, tok, spec):
    tr = tracer(model, tok, spec)
    r = tr.trace(TEMPLATE, SUBJECT)  # o = the model's own top prediction
    probs, _ = tr.clean_run(tok("The mother tongue of Danielle Darrieux is")["input_ids"], [])
    assert r.answer_id == int(probs.argmax()) and r.p_clean == pytest.approx(probs.max().item())
    wrong = next(w for w in WORDS if tok(w)["input_ids"][0] != r.answer_id)
    assert tr.trace(TEMPLATE, SUBJECT, wrong, require_correct=True) is None
    assert tr.trace(TEMPLATE, SUBJECT, r.answer, require_correct=True).correct_prediction


def test_hooks_removed_after_tracing(model, tok, spec):
    x = torch.tensor([tok("The capital city of Paris is")["input_ids"]])
    with torch.no_grad():
        before = model(x).logits.clone()
    tracer(model, tok, spec).trace("The capital city of {} is", "Paris", kinds=["hidden", "mlp", "attn"])
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_window_layers_paper_clipping():
    assert window_layers(0, 30, 10) == range(0, 5)
    assert window_layers(15, 30, 10) == range(10, 20)
    assert window_layers(29, 30, 10) == range(24, 30)
    assert window_layers(3, 30, 1) == range(3, 4)
    with pytest.raises(ValueError):
        window_layers(3, 30, 0)


def test_token_groups():
    g = token_groups(8, (1, 4))  # subject tokens 1,2,3; after: 4..7
    assert g == {"first_subject": [1], "middle_subject": [2], "last_subject": [3], "first_subsequent": [4],
                 "further": [5, 6], "last": [7]}
    g = token_groups(3, (1, 2))  # one-token subject, one token after it
    assert g["first_subject"] == g["last_subject"] == [1] and g["middle_subject"] == []
    assert g["first_subsequent"] == g["last"] == [2] and g["further"] == []


def test_average_and_roundtrip(result):
    again = TraceResult.from_dict(result.to_dict())
    assert torch.allclose(again.scores["mlp"], result.scores["mlp"]) and again.subject_range == result.subject_range
    avg = average_effects([result, again], ["hidden", "mlp"])
    assert avg["n_facts"] == 2 and set(avg["mlp"]) == set(GROUPS)
    last_subj = result.indirect_effect("mlp")[result.subject_range[1] - 1]
    assert torch.allclose(avg["mlp"]["last_subject"]["mean"], last_subj)
    assert avg["total_effect"] == pytest.approx(result.total_effect)


def test_suggest_edit_layers():
    ie = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.55, 0.6, 0.5, 0.2, 0.1, 0.0, 0.0, 0.9])  # late spike is ignored
    s = suggest_edit_layers(ie)
    assert s["rome_layer"] == 5 and s["global_peak"] == 11
    assert s["memit_layers"] == [3, 4, 5, 6]  # >= 0.8 x peak (0.48) around the early-middle peak


def test_embedding_std(model, tok, spec):
    std = embedding_std(model, tok, spec, ["Danielle Darrieux", "Paris"])
    assert std == pytest.approx(model.model.embed_tokens.weight[2:].std().item(), rel=0.5)


def test_plots_write_pngs(result, tmp_path):
    from kedit_pl.locate.plots import plot_average_heatmap, plot_average_lines, plot_trace_heatmap

    avg = average_effects([result], ["hidden", "mlp", "attn"])
    paths = [plot_trace_heatmap(result, "mlp", tmp_path / "h.png"), plot_average_heatmap(avg, "attn", tmp_path / "a.png"),
             plot_average_lines(avg, tmp_path / "l.png", groups=("last_subject", "last"))]
    for p in paths:
        assert p.exists() and p.read_bytes()[:4] == b"\x89PNG"


def test_gpt2_grid_matches_single_runs(tok):
    """The prefix-cache path also holds for GPT-2 (learned positions, Conv1D, tuple attention outputs)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=HIDDEN, n_layer=N_LAYERS, n_head=4, n_positions=64,
                                      initializer_range=0.3)).eval()
    spec = ModelSpec(name="tiny_gpt2", family="gpt2", n_layers=N_LAYERS, hidden_size=HIDDEN, layer="transformer.h.{}",
                     mlp="transformer.h.{}.mlp", attn="transformer.h.{}.attn", mlp_in="transformer.h.{}.mlp.c_fc",
                     mlp_out="transformer.h.{}.mlp.c_proj", attn_out="transformer.h.{}.attn.c_proj",
                     embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head", tied_embeddings=True)
    tr = tracer(gpt2, tok, spec, batch_rows=8)
    r = tr.trace(TEMPLATE, SUBJECT, TARGET, kinds=["hidden", "attn"])
    ids = tok("The mother tongue of Danielle Darrieux is")["input_ids"]
    for kind in ("hidden", "attn"):
        for t in range(r.subject_range[0], len(ids)):
            for layer in range(N_LAYERS):
                restore = {n: [t] for n in tr.names(kind, tr.restored_layers(kind, layer))}
                p = tr.patched_prob(ids, r.subject_range, r.answer_id, restore)
                assert r.scores[kind][t, layer].item() == pytest.approx(p, rel=1e-4, abs=1e-7), (kind, t, layer)
