"""Many edited states in one batched forward (eval/row_states.py, hooks.row_weights): each block of rows computes
exactly what a model holding its weights computes, other rows are untouched, and a run that shares forwards
writes the same records as one that generates each record right after its edit."""
import json

import pytest
import torch

from kedit_pl.eval.generate import greedy_generate, greedy_generate_states
from kedit_pl.eval.row_states import capture, edited_state
from kedit_pl.hooks import row_weights
from kedit_pl.pipeline import run_edit
from kedit_pl.weights import EditHandle, LastingRoute, snapshot, write_back
from tests.conftest import edit_cfg


class _M:
    """The parts of an EditMethod that generation uses, around a bare model."""

    def __init__(self, loaded):
        self.model, self.tok, self.device = loaded.model, loaded.tokenizer, "cpu"

    def serves_own_logits(self):
        return False

    def lasting_routes(self, rows):
        return [LastingRoute(self.model, list(r)) for r in rows]


def _edit(model, names, seed):
    """Perturb the named parameters in place (seeded); the handle restores them."""
    handle = EditHandle(snapshot(model, names))
    params = dict(model.named_parameters())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in names:
            params[n].add_(0.5 * torch.randn(params[n].shape, generator=g))
    return handle


@pytest.mark.parametrize("fixture,module", [("tiny_llama", "model.layers.0.mlp.down_proj"),
                                            ("tiny_gpt2", "transformer.h.0.mlp.c_proj")])
def test_each_block_of_rows_computes_its_own_model(request, fixture, module, one_thread):
    loaded = request.getfixturevalue(fixture)
    model = loaded.model.eval()
    ids = torch.randint(0, 200, (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        handle = _edit(model, [f"{module}.weight", f"{module}.bias"] if fixture == "tiny_gpt2" else [f"{module}.weight"], 1)
        state = edited_state(model, handle)
        edited = model(input_ids=ids).logits
        write_back(model, handle.originals)
        with row_weights(model, [(1, 3, state)]):
            mixed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert set(state) == {module}
    torch.testing.assert_close(mixed[1:3], edited[1:3], rtol=0, atol=1e-5)
    assert torch.equal(mixed[[0, 3]], base[[0, 3]])  # rows of no block: the model's own
    assert not torch.allclose(edited, base)
    assert torch.equal(after, base)  # the hooks are gone


def test_edited_state_refuses_what_a_linear_hook_cannot_carry(tiny_llama):
    model = tiny_llama.model
    handle = _edit(model, ["model.embed_tokens.weight"], 2)
    try:
        assert edited_state(model, handle) is None
    finally:
        write_back(model, handle.originals)
    unchanged = EditHandle(snapshot(model, ["model.layers.0.mlp.down_proj.weight"]))
    assert edited_state(model, unchanged) == {}  # listed, but not changed: nothing to carry
    assert edited_state(model, None) is None


def test_shared_generations_equal_each_state_alone(tiny_llama, one_thread):
    method = _M(tiny_llama)
    model = method.model.eval()
    prompts = [["Paris is", "The capital of"], ["Rome is in", "Paris is"], ["A"]]
    states, alone = [], []
    for i, _ in enumerate(prompts):
        handle = _edit(model, ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.up_proj.weight"], 10 + i)
        states.append(capture(method, edited_state(model, handle), prompts[i]))
        alone.append(greedy_generate(method, prompts[i], 12))
        write_back(model, handle.originals)
    shared = greedy_generate_states(method, prompts, states, 12, batch_rows=3)  # blocks split over two batches
    assert shared == alone
    assert len({tuple(a) for a in alone}) > 1


def test_a_run_that_shares_forwards_writes_the_same_records(tmp_path, one_thread, monkeypatch):
    from kedit_pl.eval import callback

    deferred, shared_samples = [], callback.generate_samples_states
    monkeypatch.setattr(callback, "generate_samples_states", lambda m, reqs, *a: deferred.append(len(reqs))
                        or shared_samples(m, reqs, *a))

    def run(sub, k):
        cfg = edit_cfg(tmp_path / sub, "dataset=counterfact_plus", "dataset.limit=5", "method=rome",
                       "eval.metrics=[es_ps_ns,fluency]", "eval.fluency.max_new_tokens=10",
                       f"eval.states_per_forward={k}", "method.v_num_grad_steps=3", "eval.samples.k=3")
        run_edit(cfg)
        lines = [json.loads(x) for x in (tmp_path / sub / "records.jsonl").read_text().splitlines()]
        for d in lines:
            for k in ("elapsed", "invocation", "seconds", "info"):  # timings
                d.pop(k)
        return lines

    alone, shared = run("alone", 1), run("shared", 2)  # 5 records: blocks of 2, 2, then the last one at the end
    assert [d["case_id"] for d in shared] == [d["case_id"] for d in alone]
    assert shared == alone
    assert all("fluency" in d["post"]["groups"] for d in shared)
    assert [("samples" in d["post"]) for d in shared] == [True] * 3 + [False] * 2
    assert deferred == [2, 1]  # the sampled records' generations ran in the shared forwards


@pytest.mark.parametrize("method", ["grace", "ike", "wise"])
def test_memory_methods_share_forwards_and_write_the_same_records(tmp_path, one_thread, monkeypatch, method):
    """GRACE's codebook value at a prompt's last token and IKE's demonstrations outlive the undo
    (`lasting_routes`): a shared-forward run writes what a record-by-record run writes."""
    from kedit_pl.eval.groups.fluency import Fluency

    from kedit_pl.eval import generate

    calls, blocks = [], []
    shared_measure, row_weights_ = Fluency.measure_states, generate.row_weights
    monkeypatch.setattr(Fluency, "measure_states", lambda self, m, reqs, st: calls.append(len(reqs))
                        or shared_measure(self, m, reqs, st))
    monkeypatch.setattr(generate, "row_weights", lambda model, b: blocks.extend(b) or row_weights_(model, b))
    extra = {"ike": ["method.encoder.source=tiny", "method.pool.limit=40", "method.k=2"],
             "grace": ["method.n_iter=5", "method.eps_init=1000.0"],  # GRACE: every prompt within ε
             "wise": ["method.n_iter=5", "method.act_ratio=1e-6"]}[method]  # WISE: every prompt to the side memory

    def run(sub, k):
        cfg = edit_cfg(tmp_path / sub, "dataset=counterfact_plus", "dataset.limit=3", f"method={method}", *extra,
                       "eval.metrics=[es_ps_ns,fluency]", "eval.fluency.max_new_tokens=6", f"eval.states_per_forward={k}",
                       "eval.samples.k=2", "eval.samples.max_new_tokens=5")
        s = run_edit(cfg)
        return s, [json.loads(x)["post"] for x in (tmp_path / sub / "records.jsonl").read_text().splitlines()]

    (_, alone), (shared_summary, shared) = run("alone", 1), run("shared", 3)
    assert calls == [3]  # the three records' generations in one shared pass
    assert shared == alone
    assert "fluency" in shared_summary["timing"]["seconds_by_phase"]["post"]
    assert [("samples" in p) for p in shared] == [True, True, False]
    if method == "grace":  # the value really changed the generations: they differ from the unedited model's
        pre = [json.loads(x)["pre"] for x in (tmp_path / "shared" / "records.jsonl").read_text().splitlines()]
        assert any(a["groups"]["fluency"]["text"] != b["groups"]["fluency"]["text"] for a, b in zip(pre, shared))
    if method == "wise":  # prompts routed to the side memory: their rows got its ΔW
        assert any("delta" in p for *_, params in blocks for p in params.values())


@pytest.mark.parametrize("override,field", [("eval.states_per_forward=0", "eval.states_per_forward"),
                                            ("eval.states_per_forward=abc", "eval.states_per_forward"),
                                            ("eval.states_max_mb=-1", "eval.states_max_mb"),
                                            ("eval.prefix_cache_mb=-5", "eval.prefix_cache_mb"),
                                            ("eval.prefix_cache_mb=lots", "eval.prefix_cache_mb")])
def test_a_bad_sharing_setting_is_one_line_naming_it(tmp_path, override, field):
    from kedit_pl.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{field}: must be"):
        run_edit(edit_cfg(tmp_path / "run", "dataset.limit=1", override))
    assert not (tmp_path / "run" / "records.jsonl").exists()
