"""Checks every loaded model passes: the arch templates resolve to real modules, the tokenizer fits the model."""
from __future__ import annotations

import difflib
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.models.infer import post_mlp_norm
from kedit_pl.models.spec import ModelSpec

LAYERED = ("layer", "mlp", "attn", "mlp_in", "mlp_out", "attn_out")
GLOBAL = ("embed", "final_norm", "lm_head")
WEIGHTED = ("mlp_in", "mlp_out", "attn_out", "embed", "lm_head")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (for one-line errors)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def check_arch(model: nn.Module, spec: ModelSpec, config: PretrainedConfig | None = None) -> None:
    """ConfigError unless every template resolves (layers 0 and n_layers-1) and the sizes match the config."""
    config = (config or model.config).get_text_config()
    _check_size(spec, "n_layers", getattr(config, "num_hidden_layers", None))
    _check_size(spec, "hidden_size", getattr(config, "hidden_size", None))
    for field_name in LAYERED + GLOBAL + (("mlp_post_norm",) if spec.mlp_post_norm else ()):
        for name in _template_names(spec, field_name):
            _check_module(model, spec, field_name, name)
    if spec.mlp_post_norm is None:  # MEMIT's update would silently presume the MLP output joins the residual as is
        found = post_mlp_norm(spec.module(model, "layer", 0), spec.layer)
        if found:
            raise ConfigError(f"model.arch.mlp_post_norm: unset, but the blocks norm the MLP output before the "
                              f"residual add ({found.format(0)}); fix: set model.arch.mlp_post_norm={found}")
    tied = spec.module(model, "lm_head").weight is spec.module(model, "embed").weight
    if tied != spec.tied_embeddings:
        raise ConfigError(f"model.arch.tied_embeddings: {spec.tied_embeddings} but the loaded model's lm_head is "
                          f"{'' if tied else 'not '}tied to its embedding; fix: set tied_embeddings: {str(tied).lower()}")


def _check_size(spec: ModelSpec, field_name: str, actual: Any) -> None:
    expected = getattr(spec, field_name)
    if actual is not None and int(actual) != expected:
        raise ConfigError(f"model.arch.{field_name}: {expected} but the '{spec.name}' checkpoint has {actual}; "
                          f"fix: set model.arch.{field_name}={actual}")


def _template_names(spec: ModelSpec, field_name: str) -> list[str]:
    tpl = getattr(spec, field_name)
    if not isinstance(tpl, str) or not tpl:
        raise ConfigError(f"model.arch.{field_name}: {tpl!r} is not a module-name template")
    if field_name in GLOBAL:
        if "{" in tpl:
            raise ConfigError(f"model.arch.{field_name}: {tpl!r} must not contain '{{}}' (it is not per layer)")
        return [tpl]
    if tpl.count("{}") != 1 or tpl.count("{") != 1:
        raise ConfigError(f"model.arch.{field_name}: {tpl!r} needs exactly one '{{}}' for the layer index")
    return [tpl.format(i) for i in sorted({0, spec.n_layers - 1})]


def _check_module(model: nn.Module, spec: ModelSpec, field_name: str, name: str) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.arch.{field_name}: {getattr(spec, field_name)!r} gives '{name}', which is not a "
                          f"module of {type(model).__name__}{hint}") from None
    if field_name in WEIGHTED and not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ConfigError(f"model.arch.{field_name}: '{name}' ({type(module).__name__}) has no weight; "
                          f"point it at a Linear/Conv1D/Embedding module")


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    """ConfigError if the tokenizer's ids do not fit the model's embedding (or pad is unset)."""
    embed = spec.module(model, "embed").weight
    head = spec.module(model, "lm_head").weight
    rows, n_tok = embed.shape[0], len(tokenizer)
    where = f"model '{spec.name}'"
    if embed.shape[1] != spec.hidden_size:
        raise ConfigError(f"{where}: embedding width {embed.shape[1]} != model.arch.hidden_size {spec.hidden_size}")
    if head.shape[0] != rows:
        raise ConfigError(f"{where}: lm_head has {head.shape[0]} outputs but the embedding has {rows} rows")
    config_vocab = getattr(model.config.get_text_config(), "vocab_size", rows)
    if config_vocab != rows:
        raise ConfigError(f"{where}: config vocab_size {config_vocab} != embedding rows {rows}")
    if n_tok > rows:
        raise ConfigError(f"{where}: tokenizer has {n_tok} tokens but the embedding only {rows} rows; "
                          "fix: use the tokenizer that ships with this model")
    for role in ("bos", "eos", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id")
        if tid is not None and not 0 <= tid < rows:
            raise ConfigError(f"{where}: tokenizer {role}_token_id {tid} is outside the vocabulary (0..{rows - 1})")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{where}: tokenizer has no pad token; load it through load_model (which sets pad = eos)")


def prepare_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Pad = eos when missing; right padding (tokens.py never depends on it, but be explicit)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError("model tokenizer has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def freeze(model: PreTrainedModel) -> None:
    """Put the model in eval mode and stop gradients to every parameter."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
