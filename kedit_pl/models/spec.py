"""ModelSpec: a model's architecture facts, written once, asked for by every method."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from kedit_pl.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """Where a model keeps things. Templates take the layer index via `str.format`.

    `mlp_out` is the MLP output projection: ROME/MEMIT edit its weight, its input is the key k and
    its output the value v. `mlp_in` is the MLP input projection (up/fc). `layer` is the whole block
    (its output is the residual stream / hidden state). `mlp` and `attn` are the sub-blocks whose
    outputs causal tracing restores. `mlp_post_norm` is the norm the MLP output passes through before it joins
    the residual stream (Gemma 2/3's post_feedforward_layernorm); None where the MLP output is added as it is.
    """

    name: str
    family: str
    n_layers: int
    hidden_size: int
    layer: str
    mlp: str
    attn: str
    mlp_in: str
    mlp_out: str
    attn_out: str
    embed: str
    final_norm: str
    lm_head: str
    tied_embeddings: bool = False
    mlp_post_norm: str | None = None
    method_defaults: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "ModelSpec":
        """Build from the `model` config node (its `arch` block plus name and method defaults)."""
        arch = dict(cfg["arch"])
        try:
            return cls(name=str(cfg["name"]), method_defaults=dict(cfg.get("method_defaults") or {}), **arch)
        except TypeError as e:  # unknown or missing arch field
            raise ConfigError(f"model '{cfg.get('name')}': bad arch block ({e})") from None

    def module_name(self, template: str, layer: int | None = None) -> str:
        """Resolve a template attribute (e.g. 'mlp_out') for a layer, checking the index."""
        tpl = getattr(self, template)
        if "{}" not in tpl:
            return tpl
        if layer is None or not 0 <= layer < self.n_layers:
            raise ConfigError(f"model '{self.name}': layer {layer} out of range 0..{self.n_layers - 1} for '{template}'")
        return tpl.format(layer)

    def module(self, model: nn.Module, template: str, layer: int | None = None) -> nn.Module:
        """The submodule of `template` (at `layer`), e.g. `mlp_out` of layer 5."""
        return model.get_submodule(self.module_name(template, layer))

    def weight_name(self, template: str, layer: int | None = None) -> str:
        """The parameter name of that submodule's weight."""
        return self.module_name(template, layer) + ".weight"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a projection in (out, in) orientation, as a view.

    nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out), so its view is transposed.
    Writing through the returned view writes the parameter.
    """
    w = module.weight
    return w.t() if type(module).__name__ == "Conv1D" else w
