"""General ability's perplexity starts at the lowest touched block, bit for bit (kedit_pl/eval/block_inputs.py)."""
from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from kedit_pl.eval.block_inputs import BlockInputs, touched_block
from kedit_pl.eval.groups.general import GeneralAbility
from kedit_pl.eval.perplexity import perplexity
from kedit_pl.weights import EditHandle

TEXT = " ".join(f"The {w} of the river is near the old town and its {w} bridge." for w in
                ("north", "bank", "mouth", "course", "source", "delta", "valley", "basin", "flow", "water") * 4)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "wiki.txt"
    p.write_text(TEXT, encoding="utf-8")
    return str(p)


@contextmanager
def edited(model, name: str, scale: float = 1e-2, seed: int = 0):
    """Add noise to parameter `name`; yield its handle (the original, as an edit would keep it); restore."""
    p = dict(model.named_parameters())[name]
    orig = p.detach().clone()
    with torch.no_grad():
        p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
    try:
        yield EditHandle(originals={name: orig})
    finally:
        with torch.no_grad():
            p.copy_(orig)


def _full(m, corpus) -> float:
    return perplexity(m.model, m.tokenizer, corpus, 300, 64, 2)


def _method(m, handle=None):
    return SimpleNamespace(model=m.model, tok=m.tokenizer, spec=m.spec, last_handle=handle)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])  # GPT-2's blocks: another return structure
def test_states_edited_at_one_block_reuse_the_blocks_below_bit_for_bit(request, fixture, corpus, one_thread):
    m = request.getfixturevalue(fixture)
    g = GeneralAbility(corpus=corpus, n_tokens=300, seq_len=64, batch_size=2)
    down = m.spec.module_name("mlp_out", 1) + ".weight"
    got, want = [], []
    for seed in range(3):
        with edited(m.model, down, seed=seed) as h:
            got.append(g.measure(_method(m, h), [])[0]["ppl"])
            want.append(_full(m, corpus))
    assert got == want and len(set(got)) == 3  # equal to the last bit, and the edits did differ
    assert g._lower.kept.start == 1 and g._lower.reused == 2


def test_a_change_below_the_kept_block_runs_the_whole_model(tiny_llama, corpus, one_thread):
    m = tiny_llama
    lower = BlockInputs()
    blocks = [m.spec.module_name("layer", i) for i in range(m.spec.n_layers)]
    above = (m.spec.final_norm, m.spec.lm_head)
    with edited(m.model, m.spec.module_name("mlp_out", 1) + ".weight"):
        with lower.around(m.model, blocks, above, 1):
            _full(m, corpus)
    with edited(m.model, m.spec.module_name("mlp_out", 0) + ".weight", seed=5) as h:
        assert touched_block(m.model, blocks, above, h) == 0 and not lower.usable(m.model, blocks, above)
        with lower.around(m.model, blocks, above, 0):
            got = _full(m, corpus)
        assert lower.reused == 0
    with edited(m.model, m.spec.module_name("mlp_out", 0) + ".weight", seed=5):
        assert got == _full(m, corpus)


def test_hooks_set_the_start_and_a_hook_on_the_model_runs_it_whole(tiny_llama, corpus, one_thread):
    """GRACE and WISE hook one module: the blocks below it are kept. A hook on the model itself is below them all."""
    m = tiny_llama
    g = GeneralAbility(corpus=corpus, n_tokens=300, seq_len=64, batch_size=2)
    top = m.spec.n_layers - 1
    mod = m.model.get_submodule(m.spec.module_name("mlp_out", top))
    for i, scale in enumerate((1.1, 0.9)):
        h = mod.register_forward_hook(lambda _m, _a, out, s=scale: out * s)
        try:
            assert g.measure(_method(m), [])[0]["ppl"] == _full(m, corpus)
        finally:
            h.remove()
    assert g._lower.kept.start == top and g._lower.reused == 1
    h = m.model.register_forward_pre_hook(lambda *a: None)
    try:
        assert not g._lower.usable(m.model, [m.spec.module_name("layer", i) for i in range(m.spec.n_layers)],
                                   (m.spec.final_norm, m.spec.lm_head))
    finally:
        h.remove()


def test_another_sequence_of_forwards_is_refused(tiny_llama, corpus, one_thread):
    m = tiny_llama
    lower = BlockInputs()
    blocks = [m.spec.module_name("layer", i) for i in range(m.spec.n_layers)]
    above = (m.spec.final_norm, m.spec.lm_head)
    with lower.around(m.model, blocks, above, 1):
        _full(m, corpus)
    with pytest.raises(RuntimeError, match="same sequence"):
        with lower.around(m.model, blocks, above, 1):
            perplexity(m.model, m.tokenizer, corpus, 300, 32, 2)


def test_grace_states_start_at_its_layer(tiny_llama, corpus, tmp_path, one_thread):
    """GRACE hooks its layer's projection (changes outputs) and watches the model's inputs (`hooks.observer`: reads
    only); its states reuse the blocks below its layer, bit for bit."""
    from kedit_pl.data.datamodule import load_split
    from kedit_pl.pipeline import build_method
    from tests.conftest import edit_cfg

    m = tiny_llama
    grace = build_method(edit_cfg(tmp_path, "model=tiny_llama", "method=grace", "method.n_iter=5",
                                  "method.eps_init=1000.0"), loaded=m)
    g = GeneralAbility(corpus=corpus, n_tokens=300, seq_len=64, batch_size=2)
    reqs = load_split(edit_cfg(tmp_path).dataset.path, "counterfact")[:2]
    got, want = [], []
    try:
        for req in reqs:
            handle = grace.apply([req])
            got.append(g.measure(grace, [])[0]["ppl"])
            want.append(_full(m, corpus))
            grace.restore(handle)
    finally:
        grace.load_memory_state({k: v[:0] for k, v in grace.memory_state().items()})  # hooks off the shared model
    assert got == want  # (GRACE sets a window's last position only, whose prediction perplexity does not score)
    assert g._lower.kept.start == grace.layer > 0 and g._lower.reused == 1
