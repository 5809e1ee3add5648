"""The dequantized-model cache records a SHA-256 per file at build time and verifies it on every load: damage of
any kind (truncation, same-size noise, zeros) is detected, named, and rebuilt. A tiny model stands in for the GGUF
(its dequantization is monkeypatched), so no real 500 MB cache is touched."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from kedit_pl.models import gguf
from kedit_pl.models.tiny import byte_tokenizer, tiny_model

TINY = dict(model_type="llama", seed=0, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    source = tmp_path / "fake.gguf"
    source.write_bytes(b"GGUF stand-in")
    builds: list[int] = []

    def dequantize(_path: Path):
        builds.append(1)
        tok = byte_tokenizer()
        return tiny_model(TINY, tok), tok

    monkeypatch.setattr(gguf, "gguf_path", lambda _c: source)
    monkeypatch.setattr(gguf, "_dequantize", dequantize)
    return {"c": {"name": "fake", "cache_dir": str(tmp_path / "cache")}, "builds": builds,
            "cache": tmp_path / "cache" / "fake"}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[72, 101, 108, 108, 111]])).logits


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
        return
    start = len(data) // 2  # inside the tensor data, past the header: the file still opens
    for i in range(start, start + 64):
        data[i] = 0 if how == "zeros" else (data[i] * 7 + 13) % 256
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "noise", "zeros"])
def test_damage_is_detected_named_and_rebuilt(fake_gguf: dict, how: str, caplog: pytest.LogCaptureFixture) -> None:
    c, cache = fake_gguf["c"], fake_gguf["cache"]
    model, _ = gguf.load_gguf(c, torch.float32)
    ref = _logits(model)
    marker = gguf.read_json(cache / gguf.MARKER)
    assert set(marker["sha256"]) == set(marker["files"]) and "model.safetensors" in marker["sha256"]
    gguf.load_gguf(c, torch.float32)
    assert len(fake_gguf["builds"]) == 1  # an intact cache is used as it is

    weights = cache / "model.safetensors"
    size = weights.stat().st_size
    _damage(weights, how)
    assert (weights.stat().st_size == size) == (how != "truncate")
    problem = gguf.cache_problem(cache, gguf._fingerprint(Path(c["cache_dir"]).parent / "fake.gguf"))
    assert problem and "model.safetensors" in problem
    caplog.set_level(logging.WARNING, logger="kedit_pl.models")
    rebuilt, _ = gguf.load_gguf(c, torch.float32)
    assert len(fake_gguf["builds"]) == 2
    assert "model.safetensors" in caplog.text and "rebuilding" in caplog.text
    assert torch.equal(_logits(rebuilt), ref)  # the same results as the undamaged cache
    assert gguf.cache_problem(cache, gguf._fingerprint(Path(c["cache_dir"]).parent / "fake.gguf")) is None


def test_cache_without_digest_is_rebuilt(fake_gguf: dict, caplog: pytest.LogCaptureFixture) -> None:
    c, cache = fake_gguf["c"], fake_gguf["cache"]
    gguf.load_gguf(c, torch.float32)
    marker = gguf.read_json(cache / gguf.MARKER)
    del marker["sha256"]  # as written before digests existed
    gguf.write_json(cache / gguf.MARKER, marker)
    caplog.set_level(logging.WARNING, logger="kedit_pl.models")
    gguf.load_gguf(c, torch.float32)
    assert len(fake_gguf["builds"]) == 2 and "no content digest" in caplog.text


def test_cache_follows_the_gguf_content_not_its_path(fake_gguf: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The same GGUF installed elsewhere (another virtual environment) reuses the cache; new content rebuilds it."""
    c, cache = fake_gguf["c"], fake_gguf["cache"]
    gguf.load_gguf(c, torch.float32)
    other = tmp_path / "other_venv" / "fake.gguf"
    other.parent.mkdir()
    other.write_bytes((tmp_path / "fake.gguf").read_bytes())
    monkeypatch.setattr(gguf, "gguf_path", lambda _c: other)
    gguf.load_gguf(c, torch.float32)
    assert len(fake_gguf["builds"]) == 1
    other.write_bytes(b"GGUF stand-ix")  # same size, other content
    assert "source GGUF changed" in gguf.cache_problem(cache, gguf._fingerprint(other))
    gguf.load_gguf(c, torch.float32)
    assert len(fake_gguf["builds"]) == 2


def test_damaged_tokenizer_is_detected(fake_gguf: dict) -> None:
    c, cache = fake_gguf["c"], fake_gguf["cache"]
    gguf.load_gguf(c, torch.float32)
    _damage(cache / "tokenizer.json", "noise")
    problem = gguf.cache_problem(cache, gguf._fingerprint(Path(c["cache_dir"]).parent / "fake.gguf"))
    assert problem is not None and "tokenizer.json" in problem
