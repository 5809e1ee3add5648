"""MALMEN on the tiny models: the least-squares aggregation, exact restore, chunked factors, training, errors."""
from __future__ import annotations

import pytest
import torch

from kedit_pl.errors import ConfigError
from kedit_pl.methods.malmen import MALMEN, least_squares_shift
from kedit_pl.methods.mend import MEND
from kedit_pl.pipeline import run_edit, run_train
from tests.conftest import edit_cfg
from tests.test_mend import REQS, write_zsre


def make(loaded, **kw) -> MALMEN:
    return MALMEN(loaded.model, loaded.tokenizer, loaded.spec, **({"layers": [1, 2], "rank": 8} | kw))


def test_least_squares_shift_is_the_ridge_closed_form():
    gen = torch.Generator().manual_seed(0)
    u, d, lam = torch.randn(7, 4, generator=gen), torch.randn(7, 3, generator=gen), 0.3
    shift = least_squares_shift(u, d, lam)
    # independently: the ridge problem as an ordinary least-squares problem on [U; √λ I] S = [D; 0]
    aug_u = torch.cat([u, lam ** 0.5 * torch.eye(4)]).double()
    aug_d = torch.cat([d, torch.zeros(4, 3)]).double()
    s = torch.linalg.lstsq(aug_u, aug_d).solution
    torch.testing.assert_close(shift.double(), s.T, atol=1e-5, rtol=1e-5)
    # with λ → 0 and as many independent keys as dimensions, every key maps exactly to its value difference
    square = torch.randn(4, 4, generator=gen)
    torch.testing.assert_close(square @ least_squares_shift(square, d[:4], 1e-9).T, d[:4], atol=1e-4, rtol=1e-4)


def test_edit_adds_the_aggregated_shift_of_the_batch(tiny_llama):
    m = make(tiny_llama, edit_lr=1e-3, norm=False)
    m.ready = True
    m.eval()
    _, factors, mask = m.gradient_factors(REQS)
    rows = {p: (u[mask], d[mask]) for p, (u, d) in factors.items()}
    expect = m.editor.shifts(rows)
    before = {n: p.clone() for n, p in tiny_llama.model.named_parameters()}
    handle = m.apply(REQS)
    params = dict(tiny_llama.model.named_parameters())
    for n, shift in expect.items():
        torch.testing.assert_close(params[n] - before[n], shift.detach(), atol=1e-6, rtol=1e-4)
    m.restore(handle)
    assert all(torch.equal(p, before[n]) for n, p in tiny_llama.model.named_parameters())


def test_chunked_factors_equal_one_pass(tiny_llama):
    one, many = make(tiny_llama, chunk_size=len(REQS), norm=False), make(tiny_llama, chunk_size=1, norm=False)
    for m in (one, many):
        m.ready = True
        m.eval()
    many.editor.load_state_dict(one.editor.state_dict())
    a = one.request_deltas(REQS, *one.gradient_factors(REQS)[1:])
    b = many.request_deltas(REQS, *many.gradient_factors(REQS)[1:])
    for n in a:
        torch.testing.assert_close(a[n], b[n], atol=1e-5, rtol=1e-4)


def test_training_step_runs_and_moves_lambda(tiny_llama):
    m = make(tiny_llama, lr=1e-3, lr_lr=1e-2)
    m.train()
    opt = m.configure_optimizers()
    before = m.editor.log_lambda.detach().clone()
    out = m.losses(REQS)
    assert set(out) >= {"loss", "edit_loss", "loc_loss"} and torch.isfinite(out["loss"])
    opt.zero_grad()
    out["loss"].backward()
    assert m.editor.log_lambda.grad is not None and m.editor.log_lambda.grad.abs().sum() > 0
    opt.step()
    assert not torch.equal(m.editor.log_lambda.detach(), before)


def test_train_py_trains_and_exports_a_malmen_editor(tmp_path, tiny_llama, one_thread):
    data = write_zsre(tmp_path / "train.json", 16)
    summary = run_train(edit_cfg(tmp_path, "method=malmen", "method.rank=8", "dataset=zsre",
                                 f"dataset.train.path={data}", "train.batch_size=4", "train.val_edits=2",
                                 "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
                                 "trainer.max_steps=2", config_name="train"))
    exported = make(tiny_llama, checkpoint=summary["export"])
    assert exported.ready and "log_lambda" in exported.editor.state_dict()
    with pytest.raises(ConfigError, match="holds a MALMEN editor, but method=mend"):
        MEND(tiny_llama.model, tiny_llama.tokenizer, tiny_llama.spec, layers=[1, 2], checkpoint=summary["export"])


def test_bad_input_is_a_one_line_error(tmp_path, tiny_llama):
    with pytest.raises(ConfigError, match="method.chunk_size"):
        make(tiny_llama, chunk_size=0)
    with pytest.raises(ConfigError, match="method.checkpoint"):
        run_edit(edit_cfg(tmp_path, "method=malmen"))
