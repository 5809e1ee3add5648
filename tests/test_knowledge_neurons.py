"""Knowledge neurons (locate/knowledge_neurons.py, methods/kn.py, locate/kn_erase.py, locate.py) on tiny models."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from kedit_pl.config import CONF_DIR, compose
from kedit_pl.data.requests import EditRequest
from kedit_pl.locate.knowledge_neurons import (NeuronAttributor, NeuronLocator, coarse_neurons, read_cached_attribution,
                                               refine, shared_neurons)
from kedit_pl.methods.kn import KnowledgeNeuronsEdit
from kedit_pl.locate.kn_erase import erase_value_slots, relation_neurons, restore_weights
from kedit_pl.models.spec import linear_weight

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, TARGET = "The mother tongue of Danielle Darrieux is", "French"


def req(cid: str, rel: str = "P103", subject: str = "Danielle Darrieux", new: str = "English") -> EditRequest:
    return EditRequest(case_id=cid, subject=subject, prompt="The mother tongue of {} is", target_true="French",
                       target_new=new, paraphrases=(f"{subject}, a native speaker of", f"{subject} spoke the language"),
                       neighborhood=("The mother tongue of Léon Blum is",), relation_id=rel)


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model, before) -> None:
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- attribution ---------------------------------------------------------------------------------------
def test_completeness_per_layer(tiny_llama):
    """Σ_i Attr(w_i^(l)) ≈ P(x) − P(x with layer l's activation zeroed at the last token), for every layer."""
    att = NeuronAttributor(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, steps=300, batch_rows=600)
    res = att.attribute(PROMPT, TARGET)
    assert res.scores.shape == (4, 256)
    d_ff = att.d_ff
    for layer in range(4):
        gap = res.p_clean - att.answer_prob(PROMPT, TARGET, {layer: (list(range(d_ff)), 0.0)})
        assert abs(gap) > 1e-7  # the check below is not vacuous
        assert res.scores[layer].sum().item() == pytest.approx(gap, rel=0.02, abs=1e-8)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_prefix_cache_matches_plain(fixture, request):
    """The batched prefix-cache path computes the same IG as the plain full-sequence forward/backward."""
    lm = request.getfixturevalue(fixture)
    fast = NeuronAttributor(lm.model, lm.tokenizer, lm.spec, steps=8, batch_rows=16).attribute(PROMPT, TARGET)
    plain = NeuronAttributor(lm.model, lm.tokenizer, lm.spec, steps=8, batch_rows=1000,
                             prefix_cache=False).attribute(PROMPT, TARGET)
    assert fast.p_clean == pytest.approx(plain.p_clean, rel=1e-5)
    assert torch.allclose(fast.scores, plain.scores, atol=1e-7 * plain.scores.abs().max().item() + 1e-10, rtol=1e-3)


def test_manipulation_changes_probability(tiny_llama):
    att = NeuronAttributor(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, steps=4)
    p = att.answer_prob(PROMPT, TARGET)
    assert att.answer_prob(PROMPT, TARGET, {1: ([3, 5], 1.0)}) == pytest.approx(p, rel=1e-6)
    assert att.answer_prob(PROMPT, TARGET, {1: (list(range(256)), 0.0)}) != pytest.approx(p, rel=1e-4)


# ---- coarse neurons, refining, shared neurons ----------------------------------------------------------
def test_coarse_threshold_is_relative_to_the_max_over_all_layers():
    s = torch.zeros(3, 4)
    s[0, 1], s[2, 3], s[1, 0], s[1, 2] = 1.0, 0.25, 0.19, -2.0
    assert coarse_neurons(s, 0.2) == {(0, 1), (2, 3)}
    assert coarse_neurons(-s.abs(), 0.2) == set()


def test_refine_keeps_only_shared_neurons_and_adapts_p():
    a, b, c, d, e = (0, 1), (0, 2), (1, 5), (2, 7), (3, 3)
    bag = [{a, b, c, d}, {a, b, c, e}, {a, b, c}]
    assert refine(bag).neurons == [a, b, c]  # held by all 3 (>= 0.7 x 3)
    r = refine([{a, b, d}, {a, e}, {b, c}])  # nothing in all 3: p drops to 0.65 -> held by >= 2 of 3
    assert r.neurons == [a, b] and r.p == pytest.approx(0.65)
    many = [set((0, i) for i in range(9))] * 3  # 9 shared by all: p rises but cannot drop any; closest kept
    assert len(refine(many).neurons) == 9
    assert refine([{a}, {b}, {c}]).neurons == []  # 6 rounds (the reference's) stop at p = 0.45: >= 2 of 3
    assert refine([{a}, {b}, {c}], max_iter=10).neurons == [a, b, c]  # p = 0.3: one prompt of 3 suffices
    assert refine([set(), set()]).neurons == []


def test_shared_neurons():
    a, b, c = (0, 1), (1, 2), (2, 3)
    facts = [[a, b]] + [[a]] * 2 + [[c]] * 7  # a: 3 of 10 (> 10 %), b: only one fact, c: 7 of 10
    assert shared_neurons(facts, 0.1) == {a, c}
    assert shared_neurons(facts, 0.5) == {c}
    assert relation_neurons(facts, min_facts=3) == [(c, 7), (a, 3)]
    assert relation_neurons(facts, top_k=1) == [(c, 7)]


# ---- the cache -----------------------------------------------------------------------------------------
def test_locator_cache_roundtrip_and_torn_file(tiny_llama, tmp_path):
    att = NeuronAttributor(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, steps=4)
    first = NeuronLocator(att, tmp_path).locate(req("a"))
    assert first.seconds > 0 and len(first.prompts) == 3
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == 3
    again = NeuronLocator(att, tmp_path).locate(req("a"))
    assert again.seconds == 0 and again.neurons == first.neurons
    files[0].write_bytes(b"torn")
    assert read_cached_attribution(files[0]) is None
    third = NeuronLocator(att, tmp_path).locate(req("a"))
    assert third.neurons == first.neurons and third.seconds > 0  # recomputed, file rewritten
    assert read_cached_attribution(files[0]) is not None


# ---- update and erase ----------------------------------------------------------------------------------
def kn_method(lm, tmp_path, **kw) -> KnowledgeNeuronsEdit:
    m = KnowledgeNeuronsEdit(lm.model, lm.tokenizer, lm.spec, steps=4, cache_dir=str(tmp_path), **kw)
    m._pool = {"P103": [req("a"), req("b", subject="Léon Blum"), req("c", subject="Toko Yasuda")]}
    return m


def test_kn_update_formula_and_exact_restore(tiny_llama, tmp_path):
    m = kn_method(tiny_llama, tmp_path, shared_frac=0.99)  # nothing counts as shared: keep the fact's neurons
    r = req("a")
    _, kept, _ = m.fact_neurons(r)
    assert kept
    before = state(tiny_llama.model)
    handle = m.apply([r])
    emb = tiny_llama.model.get_output_embeddings().weight
    e_t, e_n = emb[m.tok(" French")["input_ids"][0]], emb[m.tok(" English")["input_ids"][0]]
    for layer, i in kept:
        name = tiny_llama.spec.weight_name("mlp_out", layer)
        old = before[name][:, i]
        lam1, lam2 = old.norm() / e_t.norm(), old.norm() / e_n.norm() * 8
        new = linear_weight(tiny_llama.spec.module(tiny_llama.model, "mlp_out", layer))[:, i]
        assert torch.allclose(new, old - lam1 * e_t + lam2 * e_n, atol=1e-6)
    touched = {(layer, i) for layer, i in kept}
    w0 = tiny_llama.spec.weight_name("mlp_out", kept[0][0])
    untouched = [j for j in range(256) if (kept[0][0], j) not in touched]
    assert torch.equal(tiny_llama.model.state_dict()[w0][:, untouched], before[w0][:, untouched])
    m.restore(handle)
    assert_same(tiny_llama.model, before)


def test_kn_drops_relation_shared_neurons_and_refuses_empty(tiny_llama, tmp_path):
    m = kn_method(tiny_llama, tmp_path, shared_frac=0.1)
    fact, kept, dropped = m.fact_neurons(req("a"))
    others = [m.locator.locate(q).neurons for q in m.pool("P103")[1:]]
    assert set(dropped) == {n for n in fact.neurons if any(n in o for o in others)}
    assert set(kept) | set(dropped) == set(fact.neurons)
    m.fact_neurons = lambda r: (fact, [], fact.neurons)  # every neuron shared: the record is refused up front
    assert "shared by" in m.request_problem(req("a"))


def test_kn_sequential_and_batch_through_edit_py(tmp_path):
    from kedit_pl.pipeline import run_edit

    for mode in ("sequential", "batch"):
        cfg = compose("edit", ["model=tiny_llama", "method=kn", "logger=csv", f"paths.output_dir={tmp_path / mode}",
                               "dataset.limit=3", "method.pool_limit=3", "method.shared_frac=0.99",
                               f"attribution.cache_dir={tmp_path / 'cache'}", "attribution.steps=4",
                               f"edit.mode={mode}", "edit.batch_size=3"])
        summary = run_edit(cfg)
        assert summary["post"]["n_records"] + len(summary["run"]["skipped"]) == 3
        # KN's neurons are located in the record checks: the time shows there, not in the 0.01 s edits
        setup = summary["timing"]["seconds_by_phase"]["setup"]
        assert set(setup) == {"load", "record_checks"} and setup["record_checks"] > summary["timing"]["seconds_total_edit"]


def test_erase_zeroes_slots_and_restores_exactly(tiny_gpt2):
    before = state(tiny_gpt2.model)
    neurons = [(0, 3), (0, 7), (2, 100)]
    h = erase_value_slots(tiny_gpt2.model, tiny_gpt2.spec, neurons)
    for layer, i in neurons:
        assert linear_weight(tiny_gpt2.spec.module(tiny_gpt2.model, "mlp_out", layer))[:, i].abs().sum() == 0
    restore_weights(tiny_gpt2.model, h)
    assert_same(tiny_gpt2.model, before)


# ---- configs and the entry point -----------------------------------------------------------------------
# model=hf needs model.path (a model folder to infer from); its inference is tested in test_arch_matrix.py
@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if p.stem != "hf"))
def test_configs_compose_with_every_model(model):
    cfg = compose("edit", [f"model={model}", "method=kn", "paths.output_dir=/tmp"])
    m = OmegaConf.to_container(cfg.method, resolve=True)
    assert m["steps"] == 20 and m["lambda_new"] == 8.0 and m["pool_path"] == cfg.dataset.path
    loc = compose("locate", [f"model={model}", "locate=knowledge_neurons", "paths.output_dir=/tmp"])
    assert OmegaConf.to_container(loc, resolve=True)["locate"]["factors"] == [0.0, 2.0]


def test_locate_entry_point_knowledge_neurons(tmp_path):
    from kedit_pl.locate.run import run_locate

    cfg = compose("locate", ["model=tiny_llama", "locate=knowledge_neurons", f"paths.output_dir={tmp_path}",
                             "locate.known_only=false", "locate.n_records=3", "attribution.steps=4",
                             f"attribution.cache_dir={tmp_path / 'cache'}", "locate.erase.n_relations=1"])
    s = run_locate(cfg)
    assert s["n_facts"] == 3 and len(s["layer_counts"]) == 4 and s["erase"][0]["before"]["relation"]["n_prompts"] > 0
    assert (tmp_path / "kn_layers.png").is_file() and json.loads((tmp_path / "kn_summary.json").read_text())
    assert len((tmp_path / "kn_facts.jsonl").read_text().splitlines()) == 3


def test_locate_rejects_unknown_method_and_trace_alias():
    from kedit_pl.errors import ConfigError
    from kedit_pl.locate.run import run_locate

    cfg = compose("locate", ["model=tiny_llama", "paths.output_dir=/tmp"])
    cfg.locate.name = "nope"
    with pytest.raises(ConfigError, match="locate.runner: .nope."):
        run_locate(cfg)
    import importlib.util

    spec = importlib.util.spec_from_file_location("trace_alias", CONF_DIR.parent / "trace.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.alias_args(["trace.n_records=2", "model=x", "+trace.y=1"]) == [
        "locate=causal_trace", "locate.n_records=2", "model=x", "+locate.y=1"]
