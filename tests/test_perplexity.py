"""General-ability perplexity: exp(mean NLL) over a fixed token slice, and it rises when the model breaks."""
import math

import pytest
import torch

from kedit_pl.errors import ConfigError
from kedit_pl.eval.perplexity import detokenize_wikitext, perplexity
from tests.conftest import DATA_DIR

CORPUS = DATA_DIR / "text" / "wikitext-2-tokenized" / "valid.txt"


def test_detokenize():
    assert detokenize_wikitext("a @-@ b , c @.@ 5 ( x )") == "a-b, c.5 (x)"


def test_perplexity_matches_hand_computation(tiny_llama, one_thread):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    ppl = perplexity(model, tok, CORPUS, n_tokens=300, seq_len=64, batch_size=3)
    assert 1.0 < ppl < 1e6 and math.isfinite(ppl)
    # one window by hand
    from kedit_pl.eval.perplexity import _token_slice

    ids = list(_token_slice(tok, str(CORPUS), 50))
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    row = torch.tensor([bos + ids])
    with torch.no_grad():
        logits = model(input_ids=row).logits[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, row[0, 1:])
    assert perplexity(model, tok, CORPUS, n_tokens=50, seq_len=len(bos) + 50) == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_perplexity_rises_when_weights_break(tiny_llama, one_thread):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    before = perplexity(model, tok, CORPUS, n_tokens=200, seq_len=64)
    w = model.model.layers[0].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.mul_(50.0)
    try:
        assert perplexity(model, tok, CORPUS, n_tokens=200, seq_len=64) > before
    finally:
        with torch.no_grad():
            w.copy_(saved)


def test_missing_corpus_is_a_config_error(tiny_llama):
    with pytest.raises(ConfigError, match="eval.perplexity.corpus: file not found: .*KEDIT_DATA_DIR"):
        perplexity(tiny_llama.model, tiny_llama.tokenizer, "/nonexistent/valid.txt")
