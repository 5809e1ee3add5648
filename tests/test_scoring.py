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
