"""Value optimization: requests that reach stop_loss leave the batch, and the others' trajectories are unchanged."""
import pytest
import torch

from kedit_pl.kv.values import optimize_values
from tests.test_rome import REQ, REQ2, TEMPLATES


@pytest.mark.parametrize("fast", [True, False])
def test_finished_requests_leave_the_batch(tiny_llama, fast, one_thread):
    lm = tiny_llama
    # on this random model REQ2 starts below stop_loss (≈5.47), REQ (≈5.6) never gets there: REQ2 leaves after step 0
    kw = dict(insert="layer", steps=6, lr=0.5, stop_loss=5.48, fast=fast)
    rows_seen: list[int] = []
    top = lm.spec.module(lm.model, "layer", lm.spec.n_layers - 1)
    hook = top.register_forward_hook(lambda _m, _a, out: rows_seen.append((out[0] if isinstance(out, tuple) else out).shape[0]))
    try:
        both = optimize_values(lm.model, lm.tokenizer, lm.spec, [REQ, REQ2], TEMPLATES, 1, **kw)
    finally:
        hook.remove()
    assert both.steps == [5, 0]
    per_req = len(TEMPLATES) + 1
    assert rows_seen[-1] == per_req and max(rows_seen) == 2 * per_req  # REQ2's rows left after its last step
    for i, req in enumerate([REQ, REQ2]):
        alone = optimize_values(lm.model, lm.tokenizer, lm.spec, [req], TEMPLATES, 1, **kw)
        assert alone.steps == [both.steps[i]]
        torch.testing.assert_close(both.delta[i], alone.delta[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.nll[i], alone.nll[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.kl[i], alone.kl[0], rtol=1e-4, atol=1e-7)
