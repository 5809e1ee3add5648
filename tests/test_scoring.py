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
