"""Several edited systems in one batched forward, for the generations of the single-edit protocol.

The single-edit protocol undoes every edit before the next, so each record's post-edit generations used to run
alone: ten fluency prompts per decoding step, where a step on this CPU costs 124 ms for 10 rows and 677 ms for
160 (bench/eval_speed.py). Yet what a record's edit changes is small:
- a weight editor changes a few linear layers (ROME one down projection, FT-L and MEND a few MLP matrices); the
  rest of the model is the unedited one that every record shares;
- IKE and SERAC change no weights at all: a prompt is continued by a fixed model from other ids (IKE: the
  demonstrations before it; SERAC: `[edit] [prompt]` on its counterfactual model when in scope).

So `capture` records, while the edit is in place, each prompt's route (model and ids) and the weights the edit
wrote (`edited_state`); the edit is undone; later one batched forward per model runs the prompts of many records,
each record's rows through its own weights (`kedit_pl.hooks.row_weights`). Edits that reach beyond the weights
and biases of linear layers (`nn.Linear`, GPT-2's `Conv1D`), and methods whose routes depend on state that the
undo removes, are not captured: `capture` returns None and the caller measures that record on the edited model
directly. GRACE's route carries the codebook value it sets at a prompt's last token (`LastingRoute.prompt_end`),
WISE's the ΔW of the side memory the prompt is routed to (`LastingRoute.weights`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from kedit_pl.kv.precision import is_projection
from kedit_pl.tokens import prompt_ids
from kedit_pl.weights import EditHandle, EditMethodProtocol, LastingRoute

#: module name -> {"weight": tensor, "bias": tensor}: the parameters an edit changed, as edited
EditedState = dict[str, dict[str, torch.Tensor]]


@dataclass(frozen=True)
class EditedSystem:
    """What one record's prompts run on once its edit is undone: per prompt, the model and the ids that the edited
    system continues (`routes`), and the weights of the method's model that the edit wrote (`weights`, often
    empty)."""

    routes: dict[str, LastingRoute]
    weights: EditedState


def held_bytes(systems: Iterable[EditedSystem]) -> int:
    """Memory the systems' copied parameters hold together (the edits' weights and their routes' own), in bytes;
    a tensor that several systems share (one batch's edit) counts once."""
    tensors = {id(t): t for st in systems
               for ps in [*st.weights.values(), *(p for r in st.routes.values() for p in (r.weights or {}).values())]
               for t in ps.values()}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def edited_state(model: nn.Module, handle: EditHandle | None) -> EditedState | None:
    """Copies of the parameters `handle`'s edit changed, grouped by module, taken while the edit is in place; None
    when there is no handle or the edit changed a parameter that is not a linear layer's weight or bias."""
    if handle is None:
        return None
    params = dict(model.named_parameters())
    state: EditedState = {}
    for name, original in handle.originals.items():
        current = params[name]
        if torch.equal(current, original):
            continue  # editable, but left as it was
        module_name, _, kind = name.rpartition(".")
        if kind not in ("weight", "bias") or not is_projection(model.get_submodule(module_name)):
            return None
        state.setdefault(module_name, {})[kind] = current.detach().clone()
    return state


def capture(method: EditMethodProtocol, weights: EditedState | None, prompts: list[str]) -> EditedSystem | None:
    """The edited system of `method` for `prompts`, taken while the edit that wrote `weights` (`edited_state`) is
    in place; None when it would not survive the undo (see the module docstring)."""
    if weights is None:
        return None
    unique = list(dict.fromkeys(prompts))
    routes = method.lasting_routes([prompt_ids(method.tok, p) for p in unique])
    if routes is None:
        return None
    return EditedSystem(dict(zip(unique, routes)), weights)
