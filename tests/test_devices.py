"""Device placement (kedit_pl/devices.py): trainer.accelerator picks the device the model is put on right after
loading; a missing GPU is a one-line error; large tensors stay on the CPU only when they do not fit, and say so."""
from __future__ import annotations

import logging

import pytest
import torch

from kedit_pl import devices
from kedit_pl.devices import place, run_device
from kedit_pl.errors import ConfigError
from kedit_pl.pipeline import build_method, run_edit
from tests.conftest import edit_cfg


def test_cpu_and_auto_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run_device("cpu") == torch.device("cpu")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert run_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("acc, needle", [("gpu", "no CUDA device"), ("cuda", "no CUDA device"),
                                         ("tpu", "is not one of")])
def test_unavailable_or_unknown_accelerator_is_one_line(monkeypatch, acc, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=needle) as e:
        run_device(acc)
    assert "\n" not in str(e.value) and "trainer.accelerator" in str(e.value)


def test_gpu_run_without_cuda_fails_before_loading(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("kedit_pl.models.load.load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="trainer.accelerator=gpu"):
        run_edit(edit_cfg(tmp_path, "method=rome", "trainer.accelerator=gpu"))


def test_local_rank_picks_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert run_device("gpu", local_rank=1) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_device("auto") == torch.device("cuda", 1)


def test_build_method_puts_model_and_editor_on_the_run_device(tmp_path, tiny_llama, monkeypatch):
    seen = []
    monkeypatch.setattr(devices, "run_device", lambda acc: seen.append(acc) or torch.device("cpu"))
    monkeypatch.setattr("kedit_pl.pipeline.run_device", devices.run_device)
    m = build_method(edit_cfg(tmp_path, "method=mend", "method.rank=8", "trainer.accelerator=auto"), tiny_llama)
    assert seen == ["auto"] and m.device == torch.device("cpu")
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_place_keeps_what_does_not_fit_on_the_cpu_and_logs_it(monkeypatch, caplog):
    t = {"a": torch.zeros(1000, 1000)}  # 4 MB
    monkeypatch.setattr(devices, "free_bytes", lambda d: 2_000_000)
    with caplog.at_level(logging.WARNING, logger="kedit_pl.devices"):
        out = place(t, "meta", "key statistics")
    assert out["a"].device.type == "cpu" and "kept on the CPU" in caplog.text and "key statistics" in caplog.text
    monkeypatch.setattr(devices, "free_bytes", lambda d: 100_000_000)
    assert place(t, "meta", "key statistics")["a"].device.type == "meta"  # fits: moved
    assert place(t, "cpu", "x")["a"] is t["a"]  # the CPU: nothing to move
