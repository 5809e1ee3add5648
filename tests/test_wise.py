"""WISE on the tiny models: routing, sharding and TIES merging, exact restore, the saved side memory, errors."""
from __future__ import annotations

import pytest
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.methods.wise import WISE
from kedit_pl.methods.wise_memory import WiseState, random_mask, ties_merge
from kedit_pl.pipeline import run_edit
from kedit_pl.tokens import encode_prompts
from tests.conftest import edit_cfg

REQS = [
    EditRequest("0", "Christiane Cohendy", "The mother tongue of {} is", "French", "German",
                paraphrases=("Christiane Cohendy's native language is",)),
    EditRequest("1", "Danielle Darrieux", "{} was born in the city of", "Bordeaux", "Oslo"),
]
PLAIN = ["The weather today is mild and sunny in the hills.", "Numbers can be added and multiplied."]


@pytest.fixture
def wise(tiny_llama, one_thread):
    made = []

    def build(**kw) -> WISE:
        m = WISE(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec,
                 **({"layer": 2, "n_iter": 8, "act_margin": [0.5, 2.0, 1.0]} | kw))
        made.append(m)
        return m

    yield build
    for m in made:
        m.close()


def logits(m: WISE, texts: list[str]) -> torch.Tensor:
    ids, mask, plen = encode_prompts(m.tok, texts)
    return m.routed_logits(ids, mask, plen)


def test_ties_merge_of_one_shard_is_that_shard():
    gen = torch.Generator().manual_seed(0)
    shard = torch.randn(40, 30, generator=gen) * random_mask((40, 30), 0.2, gen)  # ρ = 0.2 ≤ density
    assert torch.equal(ties_merge([shard], density=0.53), shard)


def test_ties_merge_trims_elects_and_takes_the_disjoint_mean():
    a = torch.tensor([3.0, -2.0, 0.1, 0.0])
    b = torch.tensor([1.0, 4.0, -0.2, 0.0])
    # density 0.5: a keeps 3, -2; b keeps 1, 4. Signs: +, + (−2 + 4 > 0), 0 -> +, 0 -> +.
    # entry 0: mean(3, 1) = 2; entry 1: only b agrees -> 4; entries 2, 3: nothing kept -> 0
    assert torch.equal(ties_merge([a, b], density=0.5), torch.tensor([2.0, 4.0, 0.0, 0.0]))


def test_text_routed_to_the_main_memory_is_the_unedited_model(wise):
    m = wise()
    before = logits(m, PLAIN + [REQS[0].rewrite])
    handle = m.apply(REQS[:1])
    ids, _, plen = encode_prompts(m.tok, PLAIN + [REQS[0].rewrite])
    routes = m.prompt_routes([ids[b, :n].tolist() for b, n in enumerate(plen)])
    assert routes[-1] == 0, "the edit prompt must reach its side memory"
    main = [b for b, r in enumerate(routes) if r < 0]
    assert main, f"no plain text was routed to the main memory: {routes}, {handle.info}"
    after = logits(m, PLAIN + [REQS[0].rewrite])
    assert torch.equal(after[main], before[main])
    assert not torch.equal(after[-1], before[-1])


def test_restore_is_exact_and_the_model_is_never_written(wise, tiny_llama):
    m = wise()
    weights = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    base = logits(m, PLAIN)
    first = m.apply(REQS[:1])
    snap = m.state.copy()
    second = m.apply(REQS[1:])
    m.restore(second)
    assert torch.equal(m.state.current.delta, snap.current.delta) and m.state.n_edits == snap.n_edits
    m.restore(first)
    assert m.state.empty() and m.state.n_edits == 0
    assert torch.equal(logits(m, PLAIN), base)
    assert all(torch.equal(p, weights[n]) for n, p in tiny_llama.model.named_parameters())


@pytest.mark.parametrize("variant, memories", [("merge", 1), ("retrieve", 2)])
def test_shards_close_and_merge_with_ties(wise, variant, memories):
    m = wise(variant=variant, save_freq=1, merge_freq=2, n_iter=3)
    for r in REQS:
        m.apply([r])
    assert len(m.state.memories) == 1 and not m.state.shards and m.state.current is None
    for r in REQS:  # a second group of two shards
        m.apply([r])
    assert len(m.state.memories) == memories
    if variant == "retrieve":
        assert m.state.memories[1].n_edits == 2
    else:
        assert m.state.memories[0].n_edits == 4


def test_sharding_masks_the_gradient(wise):
    m = wise(mask_ratio=0.1)
    m.apply(REQS[:1])
    changed = m.state.current.delta != 0
    assert changed.any() and not (changed & (m.state.mask == 0)).any()


def test_saved_side_memory_reloads(wise, tmp_path):
    m = wise()
    m.apply(REQS[:1])
    out = logits(m, [REQS[0].rewrite] + PLAIN)
    path = m.save_memory(tmp_path / "side.safetensors")
    m2 = wise(memory_load=str(path))
    m.close()
    assert torch.equal(logits(m2, [REQS[0].rewrite] + PLAIN), out)
    with pytest.raises(ConfigError, match="memory_load.*variant"):
        wise(memory_load=str(path), variant="retrieve")


@pytest.mark.parametrize("kw, field", [({"variant": "both"}, "method.variant"),
                                       ({"save_freq": 3, "merge_freq": 4}, "method.save_freq/merge_freq"),
                                       ({"mask_ratio": 0.0}, "method.mask_ratio"),
                                       ({"act_margin": [1.0, 2.0]}, "method.act_margin"),
                                       ({"irrelevant_texts": []}, "method.irrelevant_texts")])
def test_bad_config_is_a_one_line_error(wise, kw, field):
    with pytest.raises(ConfigError) as e:
        wise(**kw)
    assert field in str(e.value) and "\n" not in str(e.value)


def test_edit_run_writes_the_side_memory(tmp_path, one_thread):
    summary = run_edit(edit_cfg(tmp_path, "method=wise", "method.n_iter=3", "edit.mode=sequential",
                                "dataset.limit=2"))
    assert "post" in summary
    assert (tmp_path / "wise_memory.safetensors").is_file()
    state, meta = WiseState.load(tmp_path / "wise_memory.safetensors")
    assert state.n_edits == 2 and meta["variant"] == "merge"


def test_python_api_reverts_and_saves_the_side_memory(tmp_path, one_thread):
    from kedit_pl.api import Editor

    ed = Editor(method="wise", model="tiny_llama", method__n_iter=3)
    try:
        weights = ed.digest()
        edit = ed.edit(subject="Danielle Darrieux", prompt="{} was born in the city of", target_new="Oslo",
                       target_true="Paris")
        assert not ed.method.state.empty() and ed.digest() == weights  # the main memory is untouched
        path = edit.save(tmp_path / "darrieux")
        assert WiseState.load(path)[0].n_edits == 1
        edit.revert()
        assert ed.method.state.empty()
    finally:
        ed.method.close()


def test_cached_scoring_and_full_scoring_route_alike(wise):
    from kedit_pl.eval.scoring import score_pairs_full, score_prefixed

    m = wise()
    m.apply(REQS[:1])
    prompts = [REQS[0].rewrite, REQS[0].paraphrases[0], *PLAIN]
    targets = ["German", "German", "rain", "seven"]
    fn = m.logits_fn()
    full = score_pairs_full(fn, m.tok, prompts, targets)
    cached = score_prefixed(fn.prefixes, m.tok, prompts, targets)
    for a, b in zip(full, cached):
        assert a.acc == b.acc and abs(a.nll - b.nll) < 1e-4


def test_margins_come_from_the_model_config_or_the_reference():
    from kedit_pl.config import compose

    def margins(model: str) -> list[float]:
        return list(compose("edit", ["method=wise", f"model={model}", "paths.output_dir=/tmp"]).method.act_margin)

    assert margins("smollm2_135m") == [20.0, 100.0, 80.0]  # SmolLM2's activation scale
    assert margins("tiny_llama") == [5.0, 20.0, 10.0]       # the reference's LLaMA-2-7B margins


def test_gpt2_conv1d_projection_routes_too(tiny_gpt2, one_thread):
    m = WISE(tiny_gpt2.model, tiny_gpt2.tokenizer, tiny_gpt2.spec, layer=2, n_iter=30, act_margin=[0.5, 2.0, 1.0])
    try:
        before = logits(m, PLAIN + [REQS[0].rewrite])
        m.apply(REQS[:1])
        after = logits(m, PLAIN + [REQS[0].rewrite])
        ids, _, plen = encode_prompts(m.tok, PLAIN + [REQS[0].rewrite])
        routes = m.prompt_routes([ids[b, :n].tolist() for b, n in enumerate(plen)])
        assert routes[-1] == 0 and not torch.equal(after[-1], before[-1])
        assert min(routes) < 0 and all(torch.equal(after[b], before[b]) for b, r in enumerate(routes) if r < 0)
    finally:
        m.close()
