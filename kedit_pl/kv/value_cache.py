"""A disk cache of optimized values (MEMIT's z_i, eq. 16), one safetensors file per request.

Each request's δ is optimized independently of the others in its batch (its rows, its Adam state, its clamp),
so a z computed in any group is valid in every other. The cache folder is keyed by everything z depends on:
the exact current weights (a full digest, so sequential edits never reuse a stale z), the insertion layer,
the loss layer, the optimization hyperparameters and the context templates. A 1,000-edit run that is
interrupted resumes from the z vectors already written, and several processes can fill one cache in parallel.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from kedit_pl.data.requests import EditRequest
from kedit_pl.digests import weights_digest
from kedit_pl.io import cache_root, read_cache, save_cache
from kedit_pl.kv.values import ValueResult

log = logging.getLogger(__name__)


def cache_folder(root: str | Path, model: nn.Module, settings: dict[str, Any]) -> Path:
    """<root>/<weights digest>_<settings digest>: one folder per (weights, layer, hyperparameters, templates)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root(root, "z cache") / f"{weights_digest(model)}_{key}"


def request_file(folder: Path, req: EditRequest) -> Path:
    """The cache file of one request's z inside `folder` (a digest of its identity and text)."""
    key = json.dumps([req.case_id, req.subject, req.prompt, req.target_new], ensure_ascii=False)
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors"


def _save(path: Path, res: ValueResult, i: int) -> None:
    save_cache(path, {"delta": res.delta[i], "v_init": res.v_init[i], "nll": res.nll[i], "kl": res.kl[i],
                        "steps": torch.tensor(res.steps[i])})


def _load(path: Path, device: torch.device) -> ValueResult | None:
    """The cached z of one request, or None (a miss: absent, or damaged and removed)."""
    t = read_cache(path, "z cache")
    if t is None:
        return None
    return ValueResult(t["delta"][None].to(device), t["v_init"][None].to(device), t["nll"][None].to(device),
                       t["kl"][None].to(device), [int(t["steps"])], 0.0)


def cached_values(folder: Path, requests: list[EditRequest], compute: Callable[[list[EditRequest]], ValueResult],
                  group: int, device: torch.device) -> ValueResult:
    """Values for `requests` in order: read from `folder` where present, else computed `group` at a time and
    written (atomically) as soon as each group is done. `seconds` counts the computation only."""
    files = [request_file(folder, r) for r in requests]
    parts: list[ValueResult | None] = [None] * len(requests)
    seconds, computed = 0.0, 0
    while True:
        for i, f in enumerate(files):  # present from an earlier run, or written meanwhile by another process
            if parts[i] is None:
                parts[i] = _load(f, device)
        idx = [i for i, p in enumerate(parts) if p is None][:group]
        if not idx:
            break
        if not computed:
            log.info("z cache %s: %d of %d values present", folder, len(requests) - sum(p is None for p in parts),
                     len(requests))
        res = compute([requests[i] for i in idx])
        seconds, computed = seconds + res.seconds, computed + len(idx)
        for j, i in enumerate(idx):
            _save(files[i], res, j)
            parts[i] = ValueResult(res.delta[j: j + 1], res.v_init[j: j + 1], res.nll[j: j + 1], res.kl[j: j + 1],
                                   [res.steps[j]], 0.0)
        log.info("z: %d computed here, %d of %d missing (%.0f s)", computed, sum(p is None for p in parts),
                 len(requests), seconds)
    return ValueResult(torch.cat([p.delta for p in parts]), torch.cat([p.v_init for p in parts]),
                       torch.cat([p.nll for p in parts]), torch.cat([p.kl for p in parts]),
                       sum((p.steps for p in parts), []), seconds, cached=len(requests) - computed)
