"""Tiny random-init models and a file-free byte-level tokenizer: tests and smoke runs with no download."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from kedit_pl.errors import ConfigError
from kedit_pl.models.checks import first_line

EOS = "<|endoftext|>"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with the 256 byte tokens and no merges, plus `<|endoftext|>` (id 256).

    Any text round-trips exactly. `<|endoftext|>` is eos, pad and bos; bos is never auto-added.
    """
    byte_chars = _bytes_to_unicode()  # the 256 printable stand-ins ByteLevel uses; id = byte value
    vocab = {byte_chars[b]: b for b in range(256)}
    assert set(vocab) == set(pre_tokenizers.ByteLevel.alphabet()), "tokenizers' byte alphabet changed"
    vocab[EOS] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   padding_side="right", clean_up_tokenization_spaces=False)
    return fast


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the one ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def tiny_model(tiny_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A seeded random-init causal LM from `model.tiny` (model_type, seed, and config kwargs).

    The global RNG state is left untouched; the same config gives the same weights every time.
    """
    kwargs = dict(tiny_cfg)
    model_type = kwargs.pop("model_type", None)
    seed = int(kwargs.pop("seed", 0))
    if not model_type:
        raise ConfigError("model.tiny.model_type is missing; set it to a transformers model type, e.g. llama or gpt2")
    eos = tokenizer.eos_token_id
    kwargs.update(vocab_size=len(tokenizer), bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    try:
        config = AutoConfig.for_model(str(model_type), **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.tiny: cannot build a '{model_type}' config ({first_line(e)}); "
                          "fix model.tiny.model_type or its kwargs") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model
