"""Every content digest in one place: tensors (cache entries, checkpoints, patches), a model's weights (cache keys,
resume checks) and JSON values. All are SHA-256 over a name, dtype and shape header followed by the exact bytes.

`DIGEST_VERSION` names the scheme. Files that store a tensor digest store the version beside it (`VERSION_KEY` in
safetensors metadata, `digest_version` in cache-folder markers), so a file written under another scheme is
recognized as such instead of being taken for damage: caches rebuild once and say why (kedit_pl/io.py), and
run-folder checkpoints of version 1 are still verified (`tensor_digest_matches`).

Version history: 1 = blake2b-128 over a sorted dict (io) and a float32 strided sample (kv/stats fingerprint) beside
SHA-256 over an ordered list (patch); 2 = this module (patch digests kept their values).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import PurePath
from typing import Any, Iterable, Mapping

import torch
from torch import nn

DIGEST_VERSION = 2
#: safetensors metadata field holding the `DIGEST_VERSION` a file's tensor digest was made with (absent: 1)
VERSION_KEY = "kedit_digest_version"
#: strided elements per parameter in a `model_fingerprint` (cheap, and still tells any two models apart)
FINGERPRINT_SAMPLE = 65536

Tensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


def _update(h: Any, name: str, t: torch.Tensor, values: torch.Tensor | None = None) -> None:
    """Header `name|dtype|shape|` of `t`, then the bytes of `values` (default: all of `t`)."""
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    values = (t if values is None else values).detach().contiguous().cpu()
    h.update(memoryview(values.reshape(-1).view(torch.uint8).numpy()))


def tensor_digest(tensors: Tensors) -> str:
    """SHA-256 over the names, dtypes, shapes and exact bytes of named tensors, in name order (so a dict and any
    ordering of the same pairs give one digest)."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        _update(h, name, t)
    return h.hexdigest()


def weights_digest(model: nn.Module, sample: int | None = None, exclude: Iterable[str] = ()) -> str:
    """SHA-256 over a model's parameters in their own order: every exact byte (changes with any edit), or with
    `sample` a strided sample of at most about that many elements per parameter (cheap; tells models apart)."""
    skip = set(exclude)
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        if name in skip:
            continue
        flat = p.detach().reshape(-1)
        _update(h, name, p, flat if sample is None else flat[:: max(1, flat.numel() // sample)])
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """The sampled `weights_digest`: in cache keys, so that two models sharing a name (random tiny test models)
    never share cached statistics; compute it before editing the model."""
    return weights_digest(model, sample=FINGERPRINT_SAMPLE)


def json_digest(value: Any) -> str:
    """SHA-256 of a JSON value's canonical text (sorted keys; tensors, paths and numpy scalars as plain values)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, default=jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tensor_digest_matches(tensors: Mapping[str, torch.Tensor], digest: str, version: int) -> bool:
    """Whether `digest`, made with digest `version`, is that of `tensors` (files of version 1 stay readable)."""
    if version == DIGEST_VERSION:
        return tensor_digest(tensors) == digest
    if version == 1:
        return _tensor_digest_v1(tensors) == digest
    return False


def file_version(metadata: Mapping[str, str]) -> int:
    """The digest version recorded in a safetensors file's metadata (1 for files from before versions)."""
    try:
        return int(metadata.get(VERSION_KEY, 1))
    except ValueError:
        return 0


def _tensor_digest_v1(tensors: Mapping[str, torch.Tensor]) -> str:
    """Version 1 of the tensor digest, only to verify files written before version 2."""
    h = hashlib.blake2b(digest_size=16)
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}{t.dtype}{tuple(t.shape)}".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def jsonable(x: Any) -> Any:
    """`json.dumps(default=...)`: tensors as lists, paths as strings, numpy/torch scalars as numbers."""
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, PurePath):
        return str(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serializable: {type(x).__name__}")
