"""Architecture by inspection: a ModelSpec's module templates read off a loaded (or meta-device) model.

Used by `model=hf model.path=<hub id or folder>` (conf/model/hf.yaml), so a decoder needs no family YAML.
What is found, per block 0 of the decoder's ModuleList (the one with `num_hidden_layers` entries):
- attention: the child named like attn/attention; its output projection = the Linear/Conv1D with output width
  `hidden_size`, preferring o_proj/out_proj/c_proj/dense (fused QKV modules such as c_attn or query_key_value
  are never taken: their output is wider than `hidden_size`);
- MLP: the child named like mlp/ffn/feed_forward, or the block itself when its projections sit in the block
  (OPT: fc1/fc2; then `mlp` is the output projection, whose output is the MLP's output). The output projection
  maps the intermediate width back to `hidden_size` (down_proj, c_proj, fc_out, dense_4h_to_h, fc2); the input
  projection maps `hidden_size` up, preferring up_proj over a gated MLP's gate_proj;
- post-MLP norm: a norm child of the block named like post_feedforward_layernorm / post_mlp_norm (Gemma 2/3,
  OLMo 2), whose output, not the MLP's, joins the residual stream (Llama's `post_attention_layernorm` is the
  norm *before* the MLP and does not match); None when absent;
- embeddings and head from `get_input_embeddings()` / `get_output_embeddings()`; the final norm is the last
  norm module of the decoder body outside the blocks; tying is read off the weights.
Anything not identifiable is a one-line ConfigError naming what was found; `model.arch_override` sets a field.
The config resolvers that call this for conf/model/hf.yaml live in models/resolvers.py.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

from kedit_pl.errors import ConfigError

ATTN = re.compile(r"attn|attention", re.I)
MLP = re.compile(r"mlp|ffn|feed_?forward", re.I)
ATTN_OUT = ("o_proj", "out_proj", "c_proj", "dense", "wo", "o")
MLP_OUT = ("down_proj", "c_proj", "fc_out", "dense_4h_to_h", "fc2", "w2", "wo")
POST_MLP_NORM = re.compile(r"post_?(feed_?forward|ffw|ffn|mlp)", re.I)
MLP_IN = ("up_proj", "c_fc", "fc_in", "dense_h_to_4h", "fc1", "w1", "gate_up_proj", "wi")


def projection_dims(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) widths of a Linear or GPT-2 Conv1D (weight stored (in, out)); None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


def _projections(root: nn.Module, skip: tuple[str, ...] = ()) -> list[tuple[str, tuple[int, int]]]:
    """(relative name, (in, out)) of the projections under `root`, in registration order, minus `skip` subtrees."""
    out = []
    for name, m in root.named_modules():
        if any(name == s or name.startswith(s + ".") for s in skip if s):
            continue
        dims = projection_dims(m)
        if dims is not None:
            out.append((name, dims))
    return out


def _pick(cands: list[tuple[str, tuple[int, int]]], preferred: tuple[str, ...]) -> str | None:
    """The candidate whose last name part is earliest in `preferred`; else the last registered one."""
    if not cands:
        return None
    rank = {n: i for i, n in enumerate(preferred)}
    named = [c for c in cands if c[0].rsplit(".", 1)[-1] in rank]
    if named:
        return min(named, key=lambda c: rank[c[0].rsplit(".", 1)[-1]])[0]
    return cands[-1][0]


def _describe(cands: list[tuple[str, tuple[int, int]]]) -> str:
    return ", ".join(f"{n} {i}->{o}" for n, (i, o) in cands) or "no Linear/Conv1D modules"


def _blocks(model: nn.Module, n_layers: int) -> str:
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layers]
    if not lists:
        raise ConfigError(f"model.arch: no ModuleList of {n_layers} blocks (num_hidden_layers) in "
                          f"{type(model).__name__}; set model.arch_override.layer")
    return max(lists, key=lambda x: sum(p.numel() for p in x[1].parameters()))[0]


def _child(block: nn.Module, pattern: re.Pattern) -> str | None:
    """The first child named like `pattern` that holds projections (so never a norm such as ln_attn)."""
    for name, m in block.named_children():
        if pattern.search(name) and _projections(m):
            return name
    return None


def infer_arch(model: nn.Module) -> dict[str, Any]:
    """The `arch` block (templates, n_layers, hidden_size, tying, family) of a causal LM, by inspection."""
    config = model.config.get_text_config()
    n_layers, d = int(config.num_hidden_layers), int(config.hidden_size)
    kind = type(model).__name__
    blocks = _blocks(model, n_layers)
    block = model.get_submodule(f"{blocks}.0")
    attn = _child(block, ATTN)
    if attn is None:
        raise ConfigError(f"model.arch: no attention module in {kind} block {blocks}.0 (children: "
                          f"{', '.join(n for n, _ in block.named_children())}); set model.arch_override.attn")
    mlp = _child(block, MLP)
    mlp_root = block.get_submodule(mlp) if mlp else block
    found = _projections(mlp_root, skip=() if mlp else (attn,))
    where = f"{blocks}.0" + (f".{mlp}" if mlp else "")
    down = [c for c in found if c[1][1] == d and c[1][0] != d]
    up = [c for c in found if c[1][0] == d and c[1][1] != d]
    mlp_out, mlp_in = _pick(down, MLP_OUT), _pick([c for c in up if "gate" not in c[0].rsplit(".", 1)[-1]] or up, MLP_IN)
    if mlp_out is None or mlp_in is None:
        raise ConfigError(f"model.arch: cannot identify the MLP {'output' if mlp_out is None else 'input'} "
                          f"projection of {kind} (hidden {d}) in {where}: found {_describe(found)}; "
                          "set model.arch_override.mlp_out / mlp_in")
    attn_found = _projections(block.get_submodule(attn))
    attn_out = _pick([c for c in attn_found if c[1][1] == d], ATTN_OUT)
    if attn_out is None:
        raise ConfigError(f"model.arch: cannot identify the attention output projection of {kind} in "
                          f"{blocks}.0.{attn}: found {_describe(attn_found)}; set model.arch_override.attn_out")
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or id(head) not in names or id(embed) not in names:
        raise ConfigError(f"model.arch: {kind} exposes no output embeddings (LM head); it is not a causal LM")
    layer = f"{blocks}.{{}}"

    def sub(rel: str) -> str:
        return f"{layer}.{rel}" if rel else layer

    mlp_prefix = f"{mlp}." if mlp else ""
    return {"family": str(config.model_type), "n_layers": n_layers, "hidden_size": d, "layer": layer,
            "mlp": sub(mlp) if mlp else sub(mlp_out), "attn": sub(attn),
            "mlp_in": sub(mlp_prefix + mlp_in), "mlp_out": sub(mlp_prefix + mlp_out),
            "attn_out": sub(f"{attn}.{attn_out}"), "embed": names[id(embed)],
            "final_norm": _final_norm(model, blocks, kind), "lm_head": names[id(head)],
            "tied_embeddings": head.weight is embed.weight, "mlp_post_norm": post_mlp_norm(block, layer)}


def post_mlp_norm(block: nn.Module, layer: str) -> str | None:
    """The template of the block's norm applied to the MLP output before the residual add, if it has one."""
    for name, m in block.named_children():
        if POST_MLP_NORM.search(name) and "norm" in type(m).__name__.lower():
            return f"{layer}.{name}"
    return None


def _final_norm(model: nn.Module, blocks: str, kind: str) -> str:
    body = model.get_submodule(blocks.rsplit(".", 1)[0]) if "." in blocks else model
    prefix = blocks.rsplit(".", 1)[0] + "." if "." in blocks else ""
    rel_blocks = blocks[len(prefix):]
    norms = [n for n, m in body.named_modules() if n and "norm" in type(m).__name__.lower()
             and not (n == rel_blocks or n.startswith(rel_blocks + "."))]
    if not norms:
        raise ConfigError(f"model.arch: no final norm outside the blocks in {kind}; set model.arch_override.final_norm")
    return prefix + norms[-1]


def method_defaults(n_layers: int) -> dict[str, Any]:
    """Per-method layers for a model without a family YAML (the shipped models' choices, as fractions of depth).

    ROME edits layer ≈ 0.18·L (SmolLM2 5/30, GPT-J 5/28, Llama-2 6/32), MEMIT the five layers around it, below
    the last (MEMIT's GPT-J range 3..8), FT that layer, MEND the last three, WISE's side memory at ≈ 0.84·L (its
    LLaMA-2-7B layer 27/32); the loss layer is the last one.
    """
    last = n_layers - 1
    rome = min(last, round(0.18 * n_layers))
    memit = list(range(max(0, rome - 2), max(1, min(last - 1, rome + 2)) + 1))  # z's layer needs layers above it
    return {"rome": {"layer": rome, "loss_layer": last}, "memit": {"layers": memit}, "ft": {"layers": [rome]},
            "mend": {"layers": list(range(max(0, n_layers - 3), n_layers))},
            "wise": {"layer": min(last, round(0.84 * n_layers))}}
