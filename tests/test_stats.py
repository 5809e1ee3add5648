"""Key statistics (kv/stats.py): correctness against a direct computation, disk cache, resume."""
from __future__ import annotations

import pytest
import torch

from kedit_pl.errors import ConfigError
from kedit_pl.hooks import StopForward, capture, stop_after
from kedit_pl.kv.stats import StatsConfig, second_moment

TEXT = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Rome of Italy.\n"
        "Knowledge editing changes one fact in a language model while leaving the others intact.\n")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT * 40, encoding="utf-8")
    return p


def cfg(corpus, cache, **kw) -> dict:
    base = dict(corpus=str(corpus), n_samples=600, seq_len=64, batch_size=3, dtype="float64",
                cache_dir=str(cache) if cache else None, checkpoint_every=1, progress=False)
    return {**base, **kw}


def direct(lm, layer: int, corpus, n: int, seq_len: int) -> torch.Tensor:
    """E[kkᵀ] by hand: the same contiguous chunks, one chunk at a time."""
    ids = lm.tokenizer(corpus.read_text(), add_special_tokens=False)["input_ids"][:n]
    name = lm.spec.module_name("mlp_out", layer)
    acc = torch.zeros(())
    for i in range(0, n, seq_len):
        with torch.no_grad(), capture(lm.model, [name], inputs=True, outputs=False) as cap, \
                stop_after(lm.model, name):
            try:
                lm.model(input_ids=torch.tensor([ids[i:i + seq_len]]), use_cache=False)
            except StopForward:
                pass
        k = cap.inputs[name][0].double()
        acc = acc + k.T @ k
    return acc / n


def test_matches_direct_computation_for_several_layers(tiny_llama, corpus):
    C = second_moment(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [2, 1], cfg(corpus, None))
    assert sorted(C) == [1, 2]
    for layer in (1, 2):
        assert C[layer].dtype == torch.float64
        torch.testing.assert_close(C[layer], direct(tiny_llama, layer, corpus, 600, 64), rtol=1e-9, atol=1e-12)


def test_stops_after_highest_layer(tiny_gpt2, corpus):
    calls = []
    h = tiny_gpt2.spec.module(tiny_gpt2.model, "layer", 2).register_forward_hook(lambda *a: calls.append(1))
    try:
        second_moment(tiny_gpt2.model, tiny_gpt2.tokenizer, tiny_gpt2.spec, [0, 1], cfg(corpus, None))
    finally:
        h.remove()
    assert calls == []


def test_cached_equals_fresh(tiny_llama, corpus, tmp_path):
    c = cfg(corpus, tmp_path / "cache")
    first = second_moment(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1], c)[1]
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 1 and "partial" not in files[0].name
    calls = []
    h = tiny_llama.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        cached = second_moment(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1], c)[1]
    finally:
        h.remove()
    assert calls == []  # served from disk
    assert torch.equal(first, cached)
    fresh = second_moment(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1], cfg(corpus, None))[1]
    torch.testing.assert_close(fresh, cached, rtol=1e-12, atol=0)


def test_resume_after_interruption_gives_same_result(tiny_llama, corpus, tmp_path):
    lm = tiny_llama
    c = cfg(corpus, tmp_path / "cache")
    calls = []

    def crash_on_third(*_):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    h = lm.model.register_forward_pre_hook(crash_on_third)
    try:
        with pytest.raises(KeyboardInterrupt):
            second_moment(lm.model, lm.tokenizer, lm.spec, [1, 2], c)
    finally:
        h.remove()
    assert len(list((tmp_path / "cache").rglob("*.partial.safetensors"))) == 2
    calls.clear()
    h = lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        resumed = second_moment(lm.model, lm.tokenizer, lm.spec, [1, 2], c)
    finally:
        h.remove()
    n_batches = -(-(-(-600 // 64)) // 3)  # ceil(ceil(600 / 64) / 3) = 4
    assert len(calls) == n_batches - 2  # the two finished batches were not redone
    assert not list((tmp_path / "cache").rglob("*.partial.safetensors"))
    whole = second_moment(lm.model, lm.tokenizer, lm.spec, [1, 2], cfg(corpus, None))
    for layer in (1, 2):
        torch.testing.assert_close(resumed[layer], whole[layer], rtol=1e-12, atol=0)


def test_float32_accumulation(tiny_llama, corpus):
    C = second_moment(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, [1], cfg(corpus, None, dtype="float32"))
    assert C[1].dtype == torch.float32


def test_config_errors(tiny_llama, corpus, tmp_path):
    lm = tiny_llama
    with pytest.raises(ConfigError, match="n_samples"):
        second_moment(lm.model, lm.tokenizer, lm.spec, [1], cfg(corpus, None, n_samples=10**7))
    with pytest.raises(ConfigError, match="stats.corpus: file not found: .*nope.txt.*KEDIT_DATA_DIR"):
        second_moment(lm.model, lm.tokenizer, lm.spec, [1], cfg(tmp_path / "nope.txt", None))
    with pytest.raises(ConfigError, match="dtype"):
        StatsConfig.from_any(cfg(corpus, None, dtype="float16"))
    with pytest.raises(ConfigError, match="unknown"):
        StatsConfig.from_any({**cfg(corpus, None), "n_sample": 5})
