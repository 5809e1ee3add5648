"""Erasing a relation through its knowledge neurons (Dai et al., ACL 2022, §5.2), undoable like every edit.

The relation's neurons are those its facts share: at least `min_facts` facts hold them, or (the reference code)
the `top_k` most frequent ones. Erasing sets their value slots (columns of the MLP output projection) to zero.
`erase_value_slots` returns an `EditHandle`; `restore_weights(model, handle)` puts back the exact bits.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kedit_pl.locate.knowledge_neurons import Neuron, by_layer, neuron_counts
from kedit_pl.weights import EditHandle, snapshot, write_back
from kedit_pl.models.spec import ModelSpec, linear_weight


def relation_neurons(fact_neurons: Sequence[Sequence[Neuron]], min_facts: int = 5,
                     top_k: int | None = None) -> list[tuple[Neuron, int]]:
    """(neuron, number of facts holding it): the `top_k` most frequent (ties by position), or, with top_k None,
    every neuron held by >= `min_facts` facts; most frequent first."""
    ranked = neuron_counts(fact_neurons).most_common()
    return ranked[:top_k] if top_k else [(n, c) for n, c in ranked if c >= min_facts]


@torch.no_grad()
def erase_value_slots(model: nn.Module, spec: ModelSpec, neurons: Sequence[Neuron]) -> EditHandle:
    """Zero the value slots of `neurons`; the handle holds the original weights of the touched layers."""
    layers = by_layer(neurons)
    handle = EditHandle(snapshot(model, [spec.weight_name("mlp_out", layer) for layer in layers]),
                        {"neurons": [list(n) for n in neurons]}, n_requests=0)
    for layer, idx in layers.items():
        linear_weight(spec.module(model, "mlp_out", layer))[:, idx] = 0.0
    return handle


def restore_weights(model: nn.Module, handle: EditHandle) -> None:
    """Undo an erase bit-exactly."""
    write_back(model, handle.originals)
