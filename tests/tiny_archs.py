"""Tiny random decoders of twelve architectures, built with transformers' own classes (no download), saved as
local Hugging Face folders with test_rome's word-level tokenizer (one token per word, so a random model can be
steered), for `model=hf model.path=<folder>` tests."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from test_rome import word_tokenizer

from kedit_pl.kv.context import STARTS

_GPT = dict(n_embd=64, n_layer=4, n_head=4, n_inner=256, n_positions=128)
_DEC = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
            max_position_embeddings=128)
_GQA = dict(_DEC, num_key_value_heads=2)

#: model_type -> config kwargs; what each exercises is noted
ARCHS: dict[str, dict] = {
    "gpt2": _GPT,                                            # Conv1D projections, fused c_attn, tied head
    "gptj": dict(_GPT, rotary_dim=8),                        # Linear fc_in/fc_out, parallel attention + MLP
    "gpt_neox": dict(_DEC),                                  # Pythia: fused query_key_value, parallel residual
    "llama": dict(_DEC, num_key_value_heads=2),              # gated MLP (gate/up/down)
    "mistral": dict(_GQA),                                   # grouped-query attention
    "qwen2": dict(_GQA),                                     # q/k/v biases
    "qwen3": dict(_GQA, head_dim=16),                        # q/k norms
    "gemma2": dict(_GQA, head_dim=16),                       # post-MLP norm, logit soft-capping, tied head
    "gemma3_text": dict(_GQA, head_dim=16),                  # post-MLP norm, scaled embedding, tied head
    "phi3": dict(_DEC, num_key_value_heads=2),               # fused gate_up_proj, fused qkv_proj
    "opt": dict(_DEC, ffn_dim=256, word_embed_proj_dim=64),   # MLP projections fc1/fc2 directly in the block
    "falcon": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=128),
}                                                            # falcon: fused QKV, parallel attention, no MLP bias


def save_tiny(model_type: str, folder: Path, seed: int = 0, init: float = 0.1) -> Path:
    """Write a seeded random `model_type` decoder and the byte tokenizer into `folder` (save_pretrained)."""
    tok = word_tokenizer()
    tok.add_tokens(list(STARTS))  # the context templates' first words (else they tokenize to nothing)
    eos = tok.eos_token_id
    config = AutoConfig.for_model(model_type, vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos,
                                  pad_token_id=eos, **ARCHS[model_type])
    # init std 0.1, not transformers' 0.02, which leaves a 32-wide random model's logits too flat to edit
    setattr(config, "init_std" if model_type == "opt" else "initializer_range", init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
