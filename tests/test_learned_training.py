"""One training step of each learned editor (MEND, KE, SERAC) through train.py's pipeline, in full precision and
with `trainer.precision=bf16-mixed`, on the CPU and (marked `gpu`, skipped without CUDA) on CUDA."""
from __future__ import annotations

import pytest
import torch

from kedit_pl.pipeline import run_train
from tests.conftest import edit_cfg
from tests.test_mend import write_zsre

EDITORS = {"mend": ["method.rank=8"], "ke": ["method.max_scale=20"],
           "serac": ["method.encoder.source=tiny", "dataset.on_invalid=skip"]}
DEVICES = ["cpu", pytest.param("gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("accelerator", DEVICES)
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("method", list(EDITORS))
def test_one_training_step(method, precision, accelerator, tmp_path, monkeypatch):
    import kedit_pl.pipeline as pipeline

    built, before = [], {}
    real = pipeline.build_method

    def spy(cfg, loaded=None):
        m = real(cfg, loaded)
        built.append(m)
        before.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return m

    monkeypatch.setattr(pipeline, "build_method", spy)
    data = write_zsre(tmp_path / "train.json", 12)
    out = run_train(edit_cfg(tmp_path / "run", f"method={method}", *EDITORS[method], "dataset=zsre",
                             f"dataset.train.path={data}", "train.batch_size=4", "train.val_edits=2",
                             f"trainer.accelerator={accelerator}", f"trainer.precision={precision}",
                             "trainer.fast_dev_run=1", config_name="train"))
    assert out["global_step"] == 1
    (m,) = built
    after = dict(m.named_parameters())
    assert before and all(torch.isfinite(after[n]).all() and after[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the step trained the editor
    assert all(not p.requires_grad for p in m.model.parameters())  # the base model stays frozen
