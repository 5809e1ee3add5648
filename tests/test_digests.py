"""One digest module (kedit_pl/digests.py): its digests, and how files made with the older digests are treated."""
from __future__ import annotations

import hashlib
import logging

import pytest
import torch
from torch import nn

from kedit_pl.digests import (DIGEST_VERSION, VERSION_KEY, json_digest, model_fingerprint, tensor_digest,
                              tensor_digest_matches, weights_digest)
from kedit_pl.errors import ConfigError
from kedit_pl.io import CACHE_MARKER, DIGEST_KEY, cache_root, read_cache, read_json, save_cache, save_tensors
from kedit_pl.patch import rest_digest

TENSORS = {"b.weight": torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
           "a.bias": torch.tensor([1.5, -2.0], dtype=torch.float16)}


def v1_digest(tensors: dict[str, torch.Tensor]) -> str:
    """io.tensor_digest before version 2 (blake2b-128 over a sorted dict), as old cache files carry it."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def test_tensor_digest_keeps_the_patch_digest_values():
    """Patches written before the merge still apply: the value is the old patch.tensor_digest's (pinned)."""
    assert tensor_digest(TENSORS) == "264baf19416466949a30d0a953cd5054366a9946012eb3053f945354ed05fadc"


def test_tensor_digest_is_order_free_and_sees_every_bit():
    pairs = list(TENSORS.items())
    assert tensor_digest(pairs) == tensor_digest(pairs[::-1]) == tensor_digest(TENSORS)
    flipped = {k: v.clone() for k, v in TENSORS.items()}
    flipped["b.weight"].view(torch.int32)[1, 2] ^= 1  # one bit of one value
    assert tensor_digest(flipped) != tensor_digest(TENSORS)
    assert tensor_digest({"b.weight": TENSORS["b.weight"].double()}) != tensor_digest({"b.weight": TENSORS["b.weight"]})
    assert tensor_digest({"c.weight": TENSORS["b.weight"]}) != tensor_digest({"b.weight": TENSORS["b.weight"]})


def test_weights_digests_full_and_sampled():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 500), nn.Linear(500, 4))
    full, fp = weights_digest(model), model_fingerprint(model)
    # the sampled digest is the one patch.py uses for the weights a patch leaves alone
    assert weights_digest(model, sample=65536, exclude=["1.weight"]) == rest_digest(model, ["1.weight"])
    with torch.no_grad():
        model[0].weight[7, 3] += 1.0  # 90,000 elements: strided sampling skips this one
    assert weights_digest(model) != full
    assert model_fingerprint(model) == fp
    with torch.no_grad():
        model[1].bias[0] += 1.0
    assert model_fingerprint(model) != fp


def test_json_digest_is_canonical():
    assert json_digest({"a": 1, "b": [1, 2]}) == json_digest({"b": [1, 2], "a": 1})
    assert json_digest({"t": torch.tensor([1.0])}) == json_digest({"t": [1.0]})


def test_version_1_files_still_verify():
    assert tensor_digest_matches(TENSORS, v1_digest(TENSORS), 1)
    assert not tensor_digest_matches(TENSORS, v1_digest(TENSORS), DIGEST_VERSION)
    assert tensor_digest_matches(TENSORS, tensor_digest(TENSORS), DIGEST_VERSION)


def test_a_cache_entry_of_the_old_digest_is_rebuilt_once_and_says_why(tmp_path, caplog):
    path = tmp_path / "entry.safetensors"
    save_tensors(path, TENSORS, {DIGEST_KEY: v1_digest(TENSORS)})  # intact, but digested with version 1
    with caplog.at_level(logging.WARNING):
        assert read_cache(path, "z cache") is None
    assert "digest version 1, now 2" in caplog.text and not path.exists()
    save_cache(path, TENSORS)
    caplog.clear()
    got = read_cache(path, "z cache")
    assert got is not None and torch.equal(got["b.weight"], TENSORS["b.weight"]) and caplog.text == ""


def test_a_cache_root_of_the_old_digest_says_so_once(tmp_path, caplog):
    root = tmp_path / "stats"
    (root / "smollm2_135m").mkdir(parents=True)  # an older cache: entries, no marker
    with caplog.at_level(logging.WARNING):
        assert cache_root(root, "stats cache") == root
    assert "keyed by digest version 1, now 2" in caplog.text and "rebuilt once" in caplog.text
    assert read_json(root / CACHE_MARKER) == {"digest_version": DIGEST_VERSION}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cache_root(root, "stats cache")
        cache_root(tmp_path / "fresh", "z cache")  # a new cache: nothing to say
    assert caplog.text == ""


def test_a_sequential_checkpoint_of_the_old_digest_is_refused_clearly(tmp_path):
    from kedit_pl.sequential_state import SequentialState

    path = tmp_path / "sequential_state.safetensors"
    save_tensors(path, TENSORS, {DIGEST_KEY: v1_digest(TENSORS)})
    with pytest.raises(ConfigError, match="digest version 1.*edit.overwrite=true"):
        SequentialState.read(path)
    assert VERSION_KEY == "kedit_digest_version"
