"""Pre-edit scores cached on disk: hits reproduce the scores; a changed weight, record or setting misses."""
import dataclasses

import pytest
import torch

from kedit_pl.data.datamodule import load_split, select
from kedit_pl.eval.pre_cache import cached_pre_scores
from kedit_pl.eval.scoring import model_logits, score_requests
from tests.conftest import DATA_DIR, edit_cfg


@pytest.fixture
def reqs():
    return select(load_split(DATA_DIR / "counterfact/derived/counterfact_rome_format_union.json", "counterfact"),
                  limit=3)


def test_hits_reproduce_and_changes_miss(tmp_path, tiny_llama, reqs, one_thread):
    model, tok = tiny_llama.model, tiny_llama.tokenizer
    scored: list[str] = []

    def counting(fn, tok, requests, batch_size, device):
        scored.extend(r.case_id for r in requests)
        return score_requests(fn, tok, requests, batch_size, device)

    def run(requests, batch_size=64):
        scored.clear()
        return cached_pre_scores(tmp_path, model_logits(model), tok, requests, batch_size, "cpu", counting)

    first = run(reqs)
    assert scored == [r.case_id for r in reqs]
    assert run(reqs) == first and scored == []  # every record from disk, same numbers
    changed = dataclasses.replace(reqs[1], target_new=reqs[1].target_new + " x")
    again = run([reqs[0], changed, reqs[2]])
    assert scored == [changed.case_id] and again[0] == first[0] and again[1] != first[1]
    run(reqs, batch_size=7)  # another scoring setting
    assert scored == [r.case_id for r in reqs]
    w = model.get_output_embeddings().weight
    with torch.no_grad():
        w[0, 0] += 1.0
    try:
        run(reqs)  # another weight
        assert scored == [r.case_id for r in reqs]
    finally:
        with torch.no_grad():
            w[0, 0] -= 1.0


def test_routing_logits_are_never_cached(tmp_path, tiny_llama, reqs, one_thread):
    plain = model_logits(tiny_llama.model)
    routed = lambda ids, mask, prompt_lengths=None, keep=None: plain(ids, mask, prompt_lengths, keep)  # noqa: E731
    cached_pre_scores(tmp_path, routed, tiny_llama.tokenizer, reqs)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("on", [True, False])
def test_eval_cache_pre_switch(tmp_path, on):
    from kedit_pl.pipeline import run_edit

    cache = tmp_path / "cache"
    s = run_edit(edit_cfg(tmp_path / "run", "method=ft", "dataset.limit=2", f"paths.cache_dir={cache}",
                          f"eval.cache_pre={str(on).lower()}"))
    files = list((cache / "pre_scores").glob("*/*.json"))
    assert len(files) == (2 if on else 0)
    if on:  # a second run reads the pre scores back: same pre metrics
        s2 = run_edit(edit_cfg(tmp_path / "run2", "method=ft", "dataset.limit=2", f"paths.cache_dir={cache}"))
        assert s2["pre"] == s["pre"]
