"""Saved edits of memory methods (IKE, GRACE): the memory rows an edit added or changed, not a weight delta.

A memory method (`methods.base.MemoryEditMethod`) keeps its memory as tensors sharing a first axis of entries. An
edit appends rows and may change earlier ones (GRACE widens or shrinks a neighbour's radius); a text memory (IKE)
may also widen every row (its texts are zero-padded bytes). The patch stores, per tensor: the rows the edit
changed (their values before and after, zero-padded to the wider shape), the rows it appended, and both shapes.
Applying and reverting are exact row copies, bound by digests of the whole memory before and after, so a memory
patch applies only to the memory it was made on (patches of a sequence apply in order, revert in reverse order).
It uses the weight patches' files (`patch.save_patch` / `load_patch`); `meta["memory"]` marks it.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from kedit_pl.patch import FORMAT, Patch, PatchError, meta_digest, tensor_digest


def memory_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a memory (its tensors in name order)."""
    return tensor_digest(sorted(state.items()))


def is_memory_patch(patch: Patch) -> bool:
    """True for a saved edit of a memory method (memory rows, not weights)."""
    return "memory" in patch.meta


def _widen(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` zero-padded at the end of each trailing axis to `shape[1:]` (rows kept)."""
    if tuple(t.shape[1:]) == tuple(shape[1:]):
        return t
    out = t.new_zeros((t.shape[0], *shape[1:]))
    out[(slice(None), *(slice(0, n) for n in t.shape[1:]))] = t
    return out


def make_memory_patch(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                      meta: dict[str, Any] | None = None) -> Patch:
    """The patch taking memory `before` to `after` (an edit only appends rows and changes existing ones)."""
    if set(before) != set(after):
        raise PatchError(f"memory tensors differ before/after the edit: {sorted(before)} vs {sorted(after)}")
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, dict[str, list[int]]] = {}
    for key in sorted(after):
        b, a = before[key].detach().cpu(), after[key].detach().cpu()
        if a.shape[0] < b.shape[0] or a.dim() != b.dim() or any(x < y for x, y in zip(a.shape[1:], b.shape[1:])):
            raise PatchError(f"memory tensor {key!r} shrank in the edit ({tuple(b.shape)} -> {tuple(a.shape)})")
        n0 = b.shape[0]
        wb, wa = _widen(b, a.shape), a[:n0]
        rows = (wb != wa).reshape(n0, math.prod(a.shape[1:])).any(-1).nonzero().flatten()
        tensors[f"{key}::rows"] = rows.to(torch.int64)
        tensors[f"{key}::before"], tensors[f"{key}::after"] = wb[rows].clone(), wa[rows].clone()
        tensors[f"{key}::appended"] = a[n0:].clone()
        shapes[key] = {"before": list(b.shape), "after": list(a.shape)}
    full = {**(meta or {})}
    full.update(format=FORMAT, params=[], encoding={}, memory=shapes,
                digests={"before": memory_digest(before), "after": memory_digest(after)})
    full["digests"]["meta"] = meta_digest(full)  # the requests it lists are covered too (patch.load_patch checks it)
    return Patch(full, tensors)


def change_memory(state: dict[str, torch.Tensor], patch: Patch, forward: bool) -> dict[str, torch.Tensor]:
    """The memory with the patch's edit made (`forward`) or undone; PatchError if `state` is not the memory the
    patch was made on (or left by it). `state` itself is not modified."""
    where, verb = patch.meta.get("file", "patch"), "apply" if forward else "revert"
    if not is_memory_patch(patch):
        raise PatchError(f"{where}: a weight patch, not a memory method's saved edit; apply it to the model")
    want, goal = ("before", "after") if forward else ("after", "before")
    if memory_digest(state) != patch.meta["digests"][want]:
        raise PatchError(f"{where}: cannot {verb}: the method's memory is not the {'unedited' if forward else 'edited'} "
                         f"memory this edit was saved from (digest mismatch; method '{patch.meta.get('method')}'"
                         f"{', sequence step ' + str(patch.meta['step']) if 'step' in patch.meta else ''}; "
                         "edits of a sequence apply in order and revert in reverse order)")
    out: dict[str, torch.Tensor] = {}
    t = patch.tensors
    try:
        for key, shapes in patch.meta["memory"].items():
            cur, rows = state[key].detach().cpu(), t[f"{key}::rows"]
            if forward:
                x = _widen(cur, shapes["after"]).clone()
                x[rows] = t[f"{key}::after"]
                out[key] = torch.cat([x, t[f"{key}::appended"]])
            else:
                n0 = shapes["before"][0]
                x = cur[:n0].clone()
                x[rows] = t[f"{key}::before"]
                out[key] = x[(slice(None), *(slice(0, n) for n in shapes["before"][1:]))].clone()
    except (KeyError, RuntimeError, IndexError) as e:
        raise PatchError(f"{where}: memory entry is damaged ({e})") from None
    if memory_digest(out) != patch.meta["digests"][goal]:
        raise PatchError(f"{where}: {verb} did not reproduce the recorded memory (damaged patch file?)")
    return out
