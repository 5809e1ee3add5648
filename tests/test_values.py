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
    # rows the top block computed (forwards may split the rows into groups of similar length): the fast path's
    # prefix pass (every row), step 0 (both requests), steps 1-5 (REQ alone: REQ2's rows left after its last step)
    assert sum(rows_seen) == (2 * per_req if fast else 0) + 2 * per_req + 5 * per_req
    for i, req in enumerate([REQ, REQ2]):
        alone = optimize_values(lm.model, lm.tokenizer, lm.spec, [req], TEMPLATES, 1, **kw)
        assert alone.steps == [both.steps[i]]
        torch.testing.assert_close(both.delta[i], alone.delta[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.nll[i], alone.nll[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(both.kl[i], alone.kl[0], rtol=1e-4, atol=1e-7)


def test_partition_is_optimal():
    """buckets.partition: contiguous length ranges minimizing Σ rows · longest + overhead, as brute force finds."""
    import itertools
    import random

    from kedit_pl.kv.buckets import partition

    rng = random.Random(0)
    for _ in range(40):
        lengths = [rng.randint(1, 9) for _ in range(rng.randint(1, 12))]
        overhead = rng.choice([0, 3, 10, 100])
        groups = partition(lengths, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(g == sorted(g) for g in groups)

        def cost(gs):
            return sum(len(g) * max(lengths[i] for i in g) + overhead for g in gs)

        values = sorted(set(lengths))
        best = min(cost([[i for i, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in zip(
            [values[0]] + [values[c] for c in cuts], [values[c - 1] for c in cuts] + [values[-1]])])
            for k in range(len(values)) for cuts in itertools.combinations(range(1, len(values)), k))
        assert cost(groups) == best


def test_fast_path_runs_rows_in_length_groups(tiny_llama):
    """REQ's and REQ2's suffixes differ in length (and the KL rows are one token): the rows run in several
    groups, fewer tokens than one padded batch, and the values still equal the full forward's (test_rome)."""
    from kedit_pl.kv.values import _FastRunner, build_batch

    lm = tiny_llama
    batch = build_batch(lm.tokenizer, [REQ, REQ2], TEMPLATES)
    run = _FastRunner(lm.model, lm.spec, batch, 1, "layer", 3)
    padded = run.suffix["input_ids"].numel()
    with torch.no_grad():
        run.prepare()
    assert len(run.buckets) > 1
    assert sorted(torch.cat([b.rows for b in run.buckets]).tolist()) == list(range(len(batch.row_req)))
    assert sum(b.ids.numel() for b in run.buckets) < padded
