"""Batched scoring: the LM head on the last positions only gives the same scores as full logits."""
import pytest

from kedit_pl.data.datamodule import load_split, select
from kedit_pl.eval.scoring import forward_logits, model_logits, score_pairs, score_requests
from tests.conftest import DATA_DIR


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_scoring_last_positions_matches_full_logits(family, request, one_thread):
    lm = request.getfixturevalue(family)
    lm.model.eval()
    prompts = ["The capital of France is", "A", "Danielle Darrieux's mother tongue is the language called"]
    targets = ["Paris", "much longer target here", "French"]
    full = lambda ids, mask, prompt_lengths=None, keep=None: forward_logits(lm.model, ids, mask)  # noqa: E731
    fast, ref = (score_pairs(fn, lm.tokenizer, prompts, targets, batch_size=3) for fn in (model_logits(lm.model), full))
    for a, b in zip(fast, ref):
        assert a.nll == pytest.approx(b.nll, abs=1e-4) and a.acc == b.acc


def test_score_requests_layout(tiny_llama, one_thread):
    reqs = select(load_split(DATA_DIR / "counterfact/derived/counterfact_rome_format_union.json", "counterfact"),
                  limit=2)
    recs = score_requests(model_logits(tiny_llama.model), tiny_llama.tokenizer, reqs, batch_size=7)
    for req, rec in zip(reqs, recs):
        assert rec["case_id"] == req.case_id
        assert len(rec["paraphrase"]["new"]) == len(req.paraphrases)
        assert len(rec["neighborhood"]["true"]) == len(req.neighborhood)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_prompt_cache_scores_match_full_pairs(family, request, one_thread):
    """One prompt pass + continuations from its KV cache == today's one pass per (prompt, target), within 1e-5."""
    from kedit_pl.eval.scoring import score_pairs_full, score_prefixed

    lm = request.getfixturevalue(family)
    lm.model.eval()
    reqs = select(load_split(DATA_DIR / "counterfact/derived/counterfact_rome_format_union.json", "counterfact"),
                  limit=4)
    prompts, targets = [], []
    for r in reqs:
        for p in [r.rewrite, *r.paraphrases, *r.neighborhood]:
            prompts += [p, p]
            targets += [r.target_new, r.target_true]
    prompts += ["A", "The capital of France is"]  # a one-token prompt; a target repeated under another prompt
    targets += ["much longer target here", reqs[0].target_new]
    full = score_pairs_full(model_logits(lm.model), lm.tokenizer, prompts, targets, batch_size=5)
    fast = score_prefixed(model_logits(lm.model).prefixes, lm.tokenizer, prompts, targets, batch_size=5)
    assert len({len(lm.tokenizer(" " + t)["input_ids"]) for t in targets}) > 1  # mixes 1-token and longer targets
    for a, b in zip(fast, full):
        assert a.nll == pytest.approx(b.nll, abs=1e-5) and a.acc == pytest.approx(b.acc, abs=1e-6)


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_a_shared_prefix_runs_once_with_the_same_scores_and_generations(request, family, monkeypatch):
    """Rows that share >= MIN_SHARED_PREFIX leading tokens (IKE's demonstrations) run them once (`prefill`): scores
    within 1e-5 of running every row whole, greedy generations identical."""
    import torch

    from kedit_pl.eval import scoring
    from kedit_pl.eval.generate import _greedy_cached
    from kedit_pl.eval.scoring import PrefixFn, score_prefixed

    lm = request.getfixturevalue(family)
    model, tok = lm.model.eval(), lm.tokenizer
    g = torch.Generator().manual_seed(0)
    context = torch.randint(3, 200, (40,), generator=g).tolist()
    tails = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (1, 4, 7)]
    rows = [context + t for t in tails]
    assert scoring.shared_prefix_length(rows) == 40 + (tails[0][0] == tails[1][0] == tails[2][0])
    prompts = [f"p{i}" for i in range(3)]
    route: PrefixFn = lambda ids: [(model, rows[int(tok.decode(r, skip_special_tokens=True)[1:])]) for r in ids]  # noqa: E731
    targets = ["Paris", " Rome is", " a"]
    shared = score_prefixed(route, tok, prompts, targets)
    shared_gen = _greedy_cached(model, rows, 0, 8)
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**9)  # every row whole
    whole = score_prefixed(route, tok, prompts, targets)
    whole_gen = _greedy_cached(model, rows, 0, 8)
    for a, b in zip(shared, whole):
        assert a.nll == pytest.approx(b.nll, abs=1e-5) and a.acc == b.acc
    assert shared_gen == whole_gen


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_a_stored_prefix_is_read_once_per_store_with_the_same_scores_and_generations(request, family, one_thread):
    """Inside `reuse_prefixes`, a prefix that a model has read is not read again: later rows sharing it (the
    record's other metric groups, IKE's generations) run only their own tokens. Scores stay within 1e-5 of
    reading it every time, greedy generations identical; a stored prefix that only starts the new one is
    extended (positions go on from it)."""
    import functools

    import torch

    from kedit_pl.eval import scoring
    from kedit_pl.eval.generate import _greedy_cached

    model = request.getfixturevalue(family).model.eval()
    g = torch.Generator().manual_seed(1)
    context = torch.randint(3, 200, (48,), generator=g).tolist()
    rows = [context + torch.randint(3, 200, (n,), generator=g).tolist() for n in (2, 5, 9)]
    longer = [context + [7] * 6 + torch.randint(3, 200, (n,), generator=g).tolist() for n in (1, 3)]
    fresh_gen, fresh_long = _greedy_cached(model, rows, 0, 8), _greedy_cached(model, longer, 0, 8)
    fresh_logits = scoring.prefill(model, longer, 0, "cpu", last_only=True)[0].logits

    read: list[int] = []
    forward = model.forward
    model.forward = functools.wraps(forward)(lambda *a, **k: (read.append(k["input_ids"].numel()), forward(*a, **k))[1])
    try:
        with scoring.reuse_prefixes(scoring.PrefixStore()) as store:
            first_gen = _greedy_cached(model, rows, 0, 8)
            assert read[0] == scoring.shared_prefix_length(rows) and len(store.entries) == 1
            read.clear()
            again = _greedy_cached(model, rows, 0, 8)
            assert read[0] == 3 * (max(len(r) for r in rows) - scoring.shared_prefix_length(rows))  # the tails only
            read.clear()
            long_gen = _greedy_cached(model, longer, 0, 8)
            assert read[0] == scoring.shared_prefix_length(longer) - scoring.shared_prefix_length(rows)
            logits = scoring.prefill(model, longer, 0, "cpu", last_only=True)[0].logits
            read.clear()
            alone = scoring.prefill(model, rows[1:2], 0, "cpu", last_only=True)[0].logits  # a row of its own
            assert read == [len(rows[1]) - scoring.shared_prefix_length(rows)]
        assert torch.allclose(alone, scoring.prefill(model, rows[1:2], 0, "cpu", last_only=True)[0].logits, atol=1e-5)
        read.clear()
        _greedy_cached(model, rows, 0, 8)  # outside the block: no store, the prefix is read again
        assert read[0] == scoring.shared_prefix_length(rows)
    finally:
        del model.forward
    assert first_gen == again == fresh_gen and long_gen == fresh_long
    assert torch.allclose(logits, fresh_logits, atol=1e-5)


def test_prefix_store_keeps_the_newest_within_its_budget_and_drops_what_a_longer_prefix_extends():
    import torch

    from kedit_pl.eval.scoring import MIN_SHARED_PREFIX, PrefixStore

    model = torch.nn.Linear(1, 1)
    kv = lambda n: [(torch.zeros(1, 1, n, 1024), torch.zeros(1, 1, n, 1024))]  # noqa: E731  8 KiB per position
    store = PrefixStore(max_mb=1.0)  # room for 128 positions
    a, b = list(range(50)), list(range(100, 150))
    store.put(model, a, kv(50))
    store.put(model, a + [1, 2], kv(52))  # extends a: replaces it
    assert [len(t) for _, t in store.entries] == [52]
    assert store.longest(model, a + [9])[0] == 50 and store.longest(model, b)[0] == 0
    assert store.longest(model, a[:MIN_SHARED_PREFIX - 1])[0] == 0  # too short to be worth it
    assert store.longest(torch.nn.Linear(1, 1), a)[0] == 0  # another model's prefix
    store.put(model, b, kv(50))
    store.put(model, list(range(200, 250)), kv(50))  # 152 positions > 128: the oldest goes
    assert [t[0] for _, t in store.entries] == [100, 200]


@pytest.mark.parametrize("family", ["tiny_llama", "tiny_gpt2"])
def test_rows_behind_different_prefixes_share_a_batch_with_the_same_logits_and_generations(request, family,
                                                                                          monkeypatch, one_thread):
    """Several IKE records' rows in one batch: each context is read once and left-padded to the longest, masked;
    a row of no group gets padding only. Logits within 1e-5 of reading every row whole, generations identical."""
    import torch

    from kedit_pl.eval import scoring
    from kedit_pl.eval.generate import _greedy_cached

    lm = request.getfixturevalue(family)
    model = lm.model.eval()
    g = torch.Generator().manual_seed(2)
    contexts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (45, 60)]
    rows = [contexts[c] + torch.randint(3, 200, (n,), generator=g).tolist() for c, n in ((0, 2), (1, 5), (0, 7), (1, 1))]
    rows.append(torch.randint(3, 200, (9,), generator=g).tolist())  # shares nothing
    groups = scoring.prefix_groups(rows)
    assert sorted((tuple(i), n >= 45) for i, n in groups) == [((0, 2), True), ((1, 3), True), ((4,), False)]
    read: list[int] = []
    monkeypatch.setattr(scoring, "_prefix_cache", lambda m, prefix, d, f=scoring._prefix_cache: (
        read.append(len(prefix)), f(m, prefix, d))[1])
    shared_logits = scoring.prefill(model, rows, 0, "cpu", last_only=True)[0].logits
    shared_gen = _greedy_cached(model, rows, 0, 8)
    assert sorted(read) == sorted([n for _, n in groups if n] * 2)  # each context once per call
    monkeypatch.setattr(scoring, "MIN_SHARED_PREFIX", 10**9)  # every row whole
    whole_logits = scoring.prefill(model, rows, 0, "cpu", last_only=True)[0].logits
    assert torch.allclose(shared_logits, whole_logits, atol=1e-5)
    assert shared_gen == _greedy_cached(model, rows, 0, 8)


def test_generation_batches_hold_several_prefixed_systems_within_the_token_budget(monkeypatch):
    from types import SimpleNamespace

    from kedit_pl.eval import generate

    route = lambda system, n: SimpleNamespace(ids=[system] * 40 + list(range(n)))  # noqa: E731  40-token context
    rows = [(k, f"p{i}", route(k, i + 1)) for k in range(4) for i in range(3)] + [(9, "x", route(9, 1))]
    monkeypatch.setattr(generate, "PREFIXED_BATCH_TOKENS", 3 * 3 * (43 + 10))  # room for three systems' rows
    chunks = generate._chunks(rows, size=160, room=10)
    assert [sorted({k for k, *_ in c}) for c in chunks] == [[9], [0, 1, 2], [3]]
    assert [sorted({k for k, *_ in c}) for c in generate._chunks(rows, size=6, room=10)] == [[9], [0, 1], [2, 3]]


def test_a_sliding_window_model_reads_every_row_whole(tmp_path, one_thread):
    """Gemma 3's local layers attend to a window of positions: padding between a shared prefix and a row's rest
    would count as positions there, so such a model gets no shared prefix (it did before, and a row whose rest
    was padded saw fewer real tokens in its window). Logits and generations equal reading every row whole."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kedit_pl.eval import scoring
    from kedit_pl.eval.generate import _greedy_cached
    from kedit_pl.models.kv_cache import full_attention_cache
    from tiny_archs import save_tiny

    save_tiny("gemma3_text", tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    config.sliding_window = 16  # shorter than the shared prefix
    model = AutoModelForCausalLM.from_pretrained(tmp_path, config=config).eval()
    assert not full_attention_cache(model)
    g = torch.Generator().manual_seed(0)
    context = torch.randint(3, 30, (45,), generator=g).tolist()
    rows = [context + torch.randint(3, 30, (n,), generator=g).tolist() for n in (2, 7)]
    with scoring.reuse_prefixes(scoring.PrefixStore()) as store:
        logits = scoring.prefill(model, rows, 0, "cpu", last_only=True)[0].logits
        generated = _greedy_cached(model, rows, 0, 20)
    assert not store.entries
    whole = [model(input_ids=torch.tensor([r])).logits[0, -1] for r in rows]
    assert torch.allclose(logits[:, -1], torch.stack(whole), atol=1e-5)
    assert generated == [_greedy_cached(model, [r], 0, 20)[0] for r in rows]
