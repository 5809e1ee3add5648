"""Metric groups beyond ES/PS/NS: pure numbers by hand, skip-and-count, the callback on edited vs unedited
models, samples, the CounterFact-plus probes, compare columns and the resumable head-to-head."""
import copy
import json
import math

import pytest
import torch

from kedit_pl.data.readers import merge_probes
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.generate import _greedy_cached, _greedy_routed, greedy_generate
from kedit_pl.eval.groups import GroupRunner, build_groups
from kedit_pl.eval.groups.fluency import generation_entropy, ngram_entropy
from kedit_pl.eval.groups.general import GeneralAbility
from kedit_pl.eval.groups.scored import DistractingNeighborhood, Portability, SubjectAlias
from kedit_pl.eval.scoring import model_logits
from kedit_pl.methods.base import EditMethod
from kedit_pl.pipeline import run_edit
from kedit_pl.tokens import prompt_ids
from tests.conftest import DATA_DIR, edit_cfg

PLUS = DATA_DIR / "counterfact" / "original_format"
FAST = ["eval.general.n_tokens=300", "eval.general.seq_len=64", "eval.fluency.max_new_tokens=24",
        "eval.samples.max_new_tokens=8"]


class CollapseMethod(EditMethod):
    """A test 'edit' that makes every generation constant: all (tied) embedding rows equal -> equal logits."""

    def __init__(self, model=None, tokenizer=None, spec=None, **_hparams):
        super().__init__(model, tokenizer, spec)

    def edited_parameters(self, requests):
        return ["model.embed_tokens.weight"]

    def compute_edit(self, requests):
        w = self.model.model.embed_tokens.weight
        with torch.no_grad():
            w.copy_(w[:1].expand_as(w))
        return {}


class _M:
    """The parts of an EditMethod the groups use, around a bare model."""

    def __init__(self, loaded):
        self.model, self.tok, self.device = loaded.model, loaded.tokenizer, "cpu"

    def logits_fn(self):
        return model_logits(self.model)

    def serves_own_logits(self):
        return False


def req(cid="1", **kw):
    base = dict(case_id=cid, subject="Paris", prompt="{} is the capital of", target_true="France",
                target_new="Italy", neighborhood=("Lyon is in",))
    return EditRequest(**(base | kw))


# --- pure numbers -------------------------------------------------------------------------------------------
def test_generation_entropy_by_hand():
    toks = "a b a b".split()
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    assert ngram_entropy(toks, 2) == pytest.approx(h2) and ngram_entropy(toks, 3) == pytest.approx(1.0)
    assert generation_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert generation_entropy("x x x x x x") == 0.0
    assert generation_entropy("He lives in Paris. He speaks French.") > generation_entropy("Paris Paris Paris Paris")


def test_scored_group_numbers_by_hand():
    p = lambda x: -math.log(x)  # noqa: E731  (probability -> mean NLL)
    pre = {"new": [{"nll": p(0.1), "acc": 0.0}, {"nll": p(0.5), "acc": 0.5}]}
    post = {"new": [{"nll": p(0.4), "acc": 1.0}, {"nll": p(0.2), "acc": 0.5}]}
    assert Portability.numbers(post) == pytest.approx({"port_acc": 75.0, "port_p_new": 30.0})
    assert Portability.paired(pre, post) == {"port_rise": 50.0}
    dn = {"true": [{"nll": p(0.6)}, {"nll": p(0.1)}], "new": [{"nll": p(0.2)}, {"nll": p(0.3)}]}
    assert DistractingNeighborhood.numbers(dn) == pytest.approx({"dn_ns": 50.0, "dn_nm": 100 * (0.4 - 0.2) / 2})
    al = {"new": [{"nll": p(0.7)}], "true": [{"nll": p(0.2)}]}
    assert SubjectAlias.numbers(al) == pytest.approx({"alias_es": 100.0, "alias_em": 50.0})


# --- skip and count, never fake -----------------------------------------------------------------------------
def test_missing_fields_and_empty_answers_are_skipped_and_counted(tiny_llama, one_thread):
    m = _M(tiny_llama)
    reqs = [req("1", portability=(("Where is it?", "Rome"),), alternative_subject="Paname"),
            req("2", portability=(("Where is it?", "  "),)), req("3")]
    runner = GroupRunner(build_groups(["es_ps_ns", "portability", "alias"]))
    recs = [{"case_id": r.case_id} for r in reqs]
    runner.measure(m, reqs, recs)
    assert "portability" in recs[0]["groups"] and "alias" in recs[0]["groups"]
    assert "tokenizes to nothing" in recs[1]["groups_skipped"]["portability"]
    assert recs[2]["groups_skipped"] == {"portability": "no portability", "alias": "no alternative_subject"}
    counts = runner.counts([{"pre": r} for r in recs])
    assert counts["portability"]["measured"] == 1 and counts["portability"]["skipped"] == 2
    assert counts["alias"] == {"measured": 1, "skipped": 2, "skipped_because": {"no alternative_subject": 2}}
    assert set(runner.summarize(recs)) == {"port_acc", "port_p_new", "alias_es", "alias_em"}


def test_bad_metric_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown metric group 'fluncy'"):
        build_groups(["es_ps_ns", "fluncy"])
    with pytest.raises(ConfigError, match="es_ps_ns"):
        run_edit(edit_cfg(tmp_path, "eval.metrics=[fluency]"))
    assert not (tmp_path / "records.jsonl").exists()


def test_general_ability_rule():
    g = GeneralAbility(single_records=2)
    assert [g.due("single", b) for b in range(4)] == [True, True, False, False]
    assert all(g.due("batch", b) for b in range(4)) and GeneralAbility(single_records=None).due("single", 9)


def test_a_state_with_weights_already_measured_reuses_its_perplexity(tiny_llama, monkeypatch, one_thread):
    """IKE and SERAC never change the base model: their later states cost a digest, not a pass. Other weights, or a
    hook on the model (GRACE, WISE), are measured again."""
    from types import SimpleNamespace

    import torch

    from kedit_pl.eval.groups import general

    calls: list[int] = []
    monkeypatch.setattr(general, "perplexity", lambda *a, **k: calls.append(1) or 10.0 + len(calls))
    g = GeneralAbility(corpus="unused")
    method = SimpleNamespace(model=tiny_llama.model, tok=tiny_llama.tokenizer)
    assert g.measure(method, []) == g.measure(method, []) == [{"ppl": 11.0}] and len(calls) == 1
    w = tiny_llama.model.get_output_embeddings().weight
    before = w[0, 0].item()
    with torch.no_grad():
        w[0, 0] = before + 1.0
        try:
            assert g.measure(method, []) == [{"ppl": 12.0}]
        finally:
            w[0, 0] = before
    h = tiny_llama.model.register_forward_hook(lambda *a: None)
    try:
        assert g.measure(method, []) == [{"ppl": 13.0}] and g.measure(method, []) == [{"ppl": 14.0}]
    finally:
        h.remove()
    assert g.measure(method, []) == [{"ppl": 11.0}] and len(calls) == 4


# --- generation ---------------------------------------------------------------------------------------------
def test_cached_batched_generation_equals_a_full_forward_loop(tiny_llama, one_thread):
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    rows = [prompt_ids(tok, p) for p in ("Hi", "The capital of France is", "A b c")]  # left padding differs
    assert _greedy_cached(model, rows, 256, 12) == _greedy_routed(model_logits(model), rows, 256, 12, "cpu")
    texts = greedy_generate(_M(tiny_llama), ["Hi", "Hi", "A b c"], max_new_tokens=5, batch_size=2)
    assert texts[0] == texts[1] and len(texts) == 3


def test_a_routing_method_generates_through_its_own_logits(tiny_llama):
    class Routed(CollapseMethod):  # its own logits always pick "A"; the base model would not
        def logits_fn(self):
            def fn(ids, mask, prompt_lengths=None, keep=None):
                out = torch.zeros(*ids.shape, 257)
                out[..., tiny_llama.tokenizer.convert_tokens_to_ids("A")] = 1.0
                return out
            return fn

    m = Routed(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec)
    assert greedy_generate(m, ["Hi", "The capital of"], max_new_tokens=4) == ["AAAA", "AAAA"]


def test_a_prompt_routing_method_generates_each_prompt_from_its_route_with_the_cache(tiny_llama, one_thread):
    """SERAC's way: `prefixes` routes each prompt to (model, ids); generation continues exactly those ids."""
    tok, model = tiny_llama.tokenizer, tiny_llama.model
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a different model: it generates something else
        for w in other.parameters():
            w.add_(torch.randn(w.shape, generator=gen) * 0.5)
    ctx = prompt_ids(tok, "Context: the capital of France is Rome. ")

    class PromptRouted(CollapseMethod):
        def logits_fn(self):
            def fn(*a, **k):
                raise AssertionError("a prompt-routed method must not be generated token by token")
            fn.prefixes = lambda rows: [(other, ctx + r) if len(r) > 3 else (model, r) for r in rows]
            return fn

    prompts = ["Hi", "The capital of France is"]
    rows = [prompt_ids(tok, p) for p in prompts]
    got = greedy_generate(PromptRouted(model, tok, tiny_llama.spec), prompts, max_new_tokens=6)
    want = [_greedy_cached(model, [rows[0]], 256, 6)[0], _greedy_cached(other, [ctx + rows[1]], 256, 6)[0]]
    assert got == [tok.decode(ids, skip_special_tokens=True) for ids in want]
    assert got[1] != tok.decode(_greedy_cached(model, [rows[1]], 256, 6)[0], skip_special_tokens=True)


# --- the callback: pre on the unedited model, post on the edited one ----------------------------------------
def test_fluency_drops_when_the_edit_makes_generations_constant(tmp_path, one_thread):
    cfg = edit_cfg(tmp_path, "dataset=counterfact_plus", "dataset.limit=2", "+model.tiny.initializer_range=0.3",
                   "method._target_=tests.test_evalgroups.CollapseMethod", "method.name=collapse",
                   "eval.metrics=[es_ps_ns,fluency,general]", "eval.samples.k=1", *FAST)
    s = run_edit(cfg)
    assert s["pre"]["fluency_ge"] > 150 and s["post"]["fluency_ge"] < s["pre"]["fluency_ge"] - 50
    assert s["post"]["ppl"] == pytest.approx(257.0, rel=1e-5)  # equal logits over the 257-token vocabulary: ppl = V
    assert s["pre"]["ppl"] != pytest.approx(257.0)
    lines = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    for d in lines:  # every post generation is lower in entropy (the prompt's words keep it above 0)
        assert all(a < b for a, b in zip(d["post"]["groups"]["fluency"]["ge"], d["pre"]["groups"]["fluency"]["ge"]))
    after, before = lines[0]["post"]["samples"]["rewrite"]["text"], lines[0]["pre"]["samples"]["rewrite"]["text"]
    assert len(set(after)) == 1 and len(set(before)) > 1  # the edited model's continuation is one repeated token
    # pre values are the unedited model's: the same model, measured directly, gives the same numbers
    from kedit_pl.data.datamodule import EditDataModule
    from kedit_pl.models.load import load_model

    loaded = load_model(cfg.model)
    reqs = EditDataModule(cfg.dataset).prepare_requests()
    from kedit_pl.eval.groups.fluency import Fluency

    direct = Fluency(max_new_tokens=24).measure(_M(loaded), reqs)
    assert [d["pre"]["groups"]["fluency"]["ge"] for d in lines] == [r["ge"] for r in direct]
    md = (tmp_path / "samples.md").read_text()
    assert "before:" in md and "after:" in md and md.count("## case") == 2  # rewrite + neighborhood of 1 record
    assert s["metric_groups"]["fluency"] == {"measured": 2, "skipped": 0, "skipped_because": {}}
    assert s["metric_groups"]["general"] == {"states_pre": 1, "states_post": 2}


# --- data ---------------------------------------------------------------------------------------------------
def test_counterfact_plus_probes_and_merge():
    from kedit_pl.config import compose
    from kedit_pl.data.datamodule import EditDataModule

    cfg = compose("edit", ["dataset=counterfact_plus", "dataset.limit=null", "paths.output_dir=/tmp/x"])
    reqs = EditDataModule(cfg.dataset).prepare_requests()
    assert all(len(r.generation_prompts) == 10 and r.portability for r in reqs)
    first = reqs[0]
    assert first.distracting_neighborhood[0].startswith(f"{first.subject} originates from {first.target_new}.")
    assert first.portability[0][1] == "Cheesesteaks"
    aliased = [r for r in reqs if r.alternative_subject]
    assert aliased and all(r.alternative_subject != r.subject for r in aliased)  # merged from subject_replace
    with pytest.raises(ConfigError, match="different fact"):
        bad = EditRequest(case_id=aliased[0].case_id, subject="Someone", prompt="{} is in", target_true="a",
                          target_new="b")
        merge_probes([bad], "counterfact", [PLUS / "counterfact_subject_replace.json"])


# --- compare and head to head -------------------------------------------------------------------------------
def test_head_to_head_runs_skips_learned_editors_and_resumes(tmp_path, one_thread):
    from kedit_pl.compare import COLUMNS
    from kedit_pl.head_to_head import run_head_to_head

    args = ["model=tiny_llama", "logger=csv", "dataset.limit=2", f"head_to_head.out_dir={tmp_path}",
            "head_to_head.methods=[ft,mend]", "eval.samples.k=0", *FAST]
    res = run_head_to_head(args)
    assert res["methods"]["ft"]["status"] == "ran"
    assert res["methods"]["mend"]["status"] == "skipped" and "train_missing" in res["methods"]["mend"]["reason"]
    md = (tmp_path / "comparison.md").read_text()
    assert "post_fluency_ge" in md and "post_port_rise" in md and "post_ppl" in md
    assert {"post_fluency_ge", "pre_dn_ns", "post_alias_es"} <= set(COLUMNS)
    assert (tmp_path / "tradeoffs.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["run"]["split"] == "test"  # reported on test
    stamp = (tmp_path / "ft" / "summary.json").stat().st_mtime_ns
    again = run_head_to_head(args)
    assert again["methods"]["ft"]["status"] == "complete (earlier)"
    assert (tmp_path / "ft" / "summary.json").stat().st_mtime_ns == stamp


def test_head_to_head_refuses_to_rank_runs_on_different_records(tmp_path):
    from kedit_pl.errors import ConfigError
    from kedit_pl.head_to_head import run_head_to_head
    from tests.test_compare import scored_run

    from kedit_pl.config import compose
    from kedit_pl.head_to_head import EXPERIMENT, plan_runs
    from kedit_pl.io import write_json

    args = ["model=tiny_llama", "logger=csv", f"head_to_head.out_dir={tmp_path}", "head_to_head.methods=[ft,rome]"]
    plans = plan_runs(args, compose("edit", [EXPERIMENT, *args]).head_to_head, tmp_path)
    for name, rate, digest in (("ft", 0.8, "a"), ("rome", 1.0, "b")):  # complete runs of these settings: only compared
        scored_run(tmp_path / name, name, rate, digest=digest * 64)
        write_json(tmp_path / name / "run.json", plans[name][1])
    with pytest.raises(ConfigError, match="different records.*allow_different_records=true"):
        run_head_to_head(args)
    res = run_head_to_head([*args, "head_to_head.allow_different_records=true"])
    assert set(res["methods"]) == {"ft", "rome"} and (tmp_path / "tradeoffs.png").is_file()
    assert "**100.0 [100.0, 100.0]**" in (tmp_path / "comparison.md").read_text()


def test_head_to_head_trains_a_missing_learned_editor_first(tmp_path, one_thread):
    from kedit_pl.head_to_head import run_head_to_head

    train = ["method.rank=8", "dataset=counterfact", "train.batch_size=4", "train.val_edits=2", "logger=csv",
             "trainer.val_check_interval=2", "+trainer.limit_val_batches=1", "trainer.max_steps=2",
             "dataset.train.limit=12"]
    args = ["model=tiny_llama", "logger=csv", "dataset.limit=2", f"head_to_head.out_dir={tmp_path}",
            "head_to_head.methods=[mend]", "head_to_head.train_missing=true", "eval.samples.k=0", *FAST,
            "head_to_head.train.mend=[" + ",".join(f"'{t}'" for t in train) + "]"]
    assert run_head_to_head(args)["methods"]["mend"]["status"] == "ran"
    assert (tmp_path / "_train" / "mend" / "editor").is_dir()
    cfg = json.loads((tmp_path / "mend" / "summary.json").read_text())["run"]["config"]
    assert cfg["checkpoint"] == str(tmp_path / "_train" / "mend" / "editor")


def test_pre_edit_group_measurements_are_cached_across_runs(tmp_path, one_thread, monkeypatch):
    """A second run on the same unedited model and records reads every pre-edit group measurement back (eval.cache_pre);
    its post measurements are still made on the edited model."""
    from kedit_pl.eval.groups.fluency import Fluency

    calls: list[int] = []
    measure, shared = Fluency.measure, Fluency.measure_states
    monkeypatch.setattr(Fluency, "measure", lambda self, m, reqs: calls.append(len(reqs)) or measure(self, m, reqs))
    monkeypatch.setattr(Fluency, "measure_states",
                        lambda self, m, reqs, st: calls.append(("shared", len(reqs))) or shared(self, m, reqs, st))
    args = ["dataset=counterfact_plus", "dataset.limit=2", "method=ft", f"paths.cache_dir={tmp_path / 'cache'}",
            "eval.metrics=[es_ps_ns,fluency,general]", *FAST]
    first = run_edit(edit_cfg(tmp_path / "a", *args))
    assert calls == [2, ("shared", 2)]  # pre for both records, then post: both edited states in one forward
    calls.clear()
    second = run_edit(edit_cfg(tmp_path / "b", *args))
    assert calls == [("shared", 2)] and second["pre"] == first["pre"]  # post only: pre fluency and ppl were cached
    calls.clear()
    one_by_one = run_edit(edit_cfg(tmp_path / "d", *args, "eval.states_per_forward=1"))
    assert calls == [1, 1] and one_by_one["post"] == second["post"]  # each record right after its edit: same values
    calls.clear()
    capped = run_edit(edit_cfg(tmp_path / "e", *args, "eval.states_max_mb=0.001"))  # one edited state fills the cap
    assert calls == [("shared", 1), ("shared", 1)] and capped["post"] == second["post"]
    off = run_edit(edit_cfg(tmp_path / "c", *args, "eval.cache_pre=false"))
    assert off["pre"] == first["pre"]


@pytest.mark.parametrize("model", ["smollm2_135m", "gemma3_270m"])
def test_the_head_to_heads_training_recipes_compose_and_are_the_counterfact_ones(model):
    """`head_to_head.train_missing` trains each learned editor with the recipe in the map: it composes on both
    embedded models, and trains on CounterFact (MEND's zsRE recipe, once in the map, broke the model there)."""
    from kedit_pl.config import compose

    cfg = compose("edit", ["experiment=head_to_head", f"model={model}", "paths.output_dir=/tmp"])
    for name, overrides in cfg.head_to_head.train.items():
        train = compose("train", [*overrides, f"model={model}", "paths.output_dir=/tmp"])
        assert train.method.name == name and train.dataset.name.startswith("counterfact"), (name, train.dataset.name)
        assert not any("zsre" in o for o in overrides), (name, overrides)  # a recipe tuned for another dataset
