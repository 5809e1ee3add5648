"""The restore contract, below everything that edits or evaluates: snapshot and write back named parameters, the
handle an edit returns, and the protocol that evaluation, persistence and sequential state see of an editing method.

`kedit_pl.methods.base.EditMethod` implements `EditMethodProtocol`; layers below `methods/` (eval/, locate/) and the
modules beside the pipeline type against the protocol, so no import runs up the layers (docs/architecture.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass
class EditHandle:
    """Exactly what `restore` needs: the original values of every parameter the edit touched."""

    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    n_requests: int = 0
    method_state: Any = None  # method-side state that `restore` also rolls back (AlphaEdit's accumulated keys)
    #: parameter name -> the low-rank updates (left, right) written to it, in order: the parameter changed by
    #: `param += (left @ right).to(param.dtype)` for each (methods that know their update is low rank say so
    #: with `EditMethod.record_low_rank`; patch.py stores these factors instead of a dense delta)
    low_rank: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)


@dataclass(frozen=True)
class LastingRoute:
    """What one prompt's continuation runs on, in a form that outlives `restore` (`EditMethod.lasting_routes`): the
    model, the ids it reads (the prompt, or IKE's demonstrations + prompt), optionally a module's output to set
    at the prompt's last token in the first forward (GRACE's codebook value: module name, vector), and optionally
    parameters its rows use at every token (`hooks.row_weights`; WISE's side memory: {module: {"delta": ΔW}})."""

    model: nn.Module
    ids: list[int]
    prompt_end: tuple[str, torch.Tensor] | None = None
    weights: dict[str, dict[str, torch.Tensor]] | None = None


def snapshot(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Bit-exact copies of the named parameters."""
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameter named {missing[0]!r} in the model")
    return {n: params[n].detach().clone() for n in names}


@torch.no_grad()
def write_back(model: nn.Module, originals: dict[str, torch.Tensor]) -> None:
    """Copy saved values back into the named parameters (bit-exact restore)."""
    params = dict(model.named_parameters())
    for n, v in originals.items():
        params[n].copy_(v)


@runtime_checkable
class EditMethodProtocol(Protocol):
    """What code below `methods/` may use of an editing method (`kedit_pl.methods.base.EditMethod`)."""

    model: nn.Module
    tok: Any

    def edited_parameters(self, requests: list) -> list[str]:
        """Names of the parameters an edit of `requests` writes."""
        ...

    def apply(self, requests: list) -> EditHandle:
        """Edit the model for `requests`; the handle holds what `restore` needs."""
        ...

    def restore(self, handle: EditHandle) -> None:
        """Undo the edit of `handle`, bit-exactly."""
        ...

    def logits_fn(self) -> Callable[..., torch.Tensor]:
        """What scoring and generation call for logits (the model's forward, or a memory method's router)."""
        ...

    def serves_own_logits(self) -> bool:
        """True when `logits_fn` is the method's own (a router such as SERAC), not the edited model's forward."""
        ...

    def lasting_routes(self, rows: list[list[int]]) -> list[LastingRoute] | None:
        """Per prompt (token ids), what its continuation runs on once the edit is undone (None: no such form)."""
        ...

    def sequential_state(self) -> dict[str, torch.Tensor]:
        """Method-side state a sequential checkpoint saves (AlphaEdit's K_p, a memory)."""
        ...

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what `sequential_state` returned (a resumed sequential run)."""
        ...
