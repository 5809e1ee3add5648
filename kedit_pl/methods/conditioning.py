"""Conditioning a causal LM on a text context: `[context] [input]`, with the logits read back in the input's layout.

SERAC's counterfactual model h_ψ(z_e, x) (Mitchell et al. 2022, §3) reads the edit as such a prefix (the context
is `context_template` filled with the edit, default "{prompt} {target}\n"); IKE (Zheng et al. 2023) puts its
demonstrations and the new fact before the input of the frozen base model. A context is text, or token ids that
already start with the tokenizer's leading special tokens (IKE builds its demonstrations from ids, so that they
are tokenized exactly as the input they precede). An input row of the
base model (right-padded ids, possibly starting with the tokenizer's BOS) becomes
    prefix ids + the row without its leading special tokens,
and the conditioned logits are read back at the positions of the original row, so they have exactly the
base model's (B, T, V) layout: the logits at row position j come from conditioned position j + offset,
with offset = len(prefix) − n_leading_special (a BOS position maps to the prefix's last token).
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.eval.scoring import forward_logits
from kedit_pl.tokens import pad_id

#: a context: text, or ids starting with the tokenizer's leading special tokens
Context = str | list[int]


def leading_specials(tok: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer puts before a text (e.g. 1 for a BOS-adding tokenizer)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    n = len(full) - len(plain)
    if n < 0 or full[n:] != plain:
        raise ConfigError("model tokenizer adds special tokens after the text; conditioning on a context "
                          "supports leading special tokens (BOS) only")
    return n


class Conditioner:
    """Builds `[context] [input]` batches for a model and aligns its logits to the input rows."""

    def __init__(self, tok: PreTrainedTokenizerBase, template: str = "{prompt} {target}\n") -> None:
        try:
            template.format(prompt="p", target="t")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"method.context_template: {template!r} must use only {{prompt}} and {{target}} ({e})") from None
        self.tok = tok
        self.template = template
        self.lead = leading_specials(tok)

    def context(self, prompt: str, target: str) -> str:
        """An edit (SERAC's z_e) as text, by `template`."""
        return self.template.format(prompt=prompt, target=target)

    def context_ids(self, context: Context) -> list[int]:
        """A context's ids: text is tokenized with the tokenizer's special tokens, ids are taken as they are."""
        return self.tok(context)["input_ids"] if isinstance(context, str) else list(context)

    def batch(self, contexts: list[Context], input_ids: torch.Tensor,
              lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded conditioned ids, their mask, and each row's offset (see module doc)."""
        rows, offsets = [], []
        for ctx, row, n in zip(contexts, input_ids.tolist(), lengths):
            pre = self.context_ids(ctx)
            rows.append(pre + row[self.lead:n])
            offsets.append(len(pre) - self.lead)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id(self.tok), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r)] = torch.tensor(r)
            mask[b, :len(r)] = 1
        device = input_ids.device
        return ids.to(device), mask.to(device), torch.tensor(offsets, device=device)

    def logits(self, model: nn.Module, contexts: list[Context], input_ids: torch.Tensor,
               attention_mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Logits of `model` reading `[context] [input]`, aligned to `input_ids`' positions (padding positions: arbitrary).

        (B, T, V), or with `keep` the last `keep` input positions only, (B, keep, V): the LM head then runs on
        just the conditioned positions those map to, as `eval.scoring.forward_logits` does for the base model.
        """
        lengths = attention_mask.sum(-1).tolist()
        ids, mask, offsets = self.batch(contexts, input_ids, lengths)
        width, first = ids.shape[1], input_ids.shape[1] - (keep or input_ids.shape[1])
        start = first + int(offsets.min())  # first conditioned position any row needs
        cf = forward_logits(model, ids, mask, None if keep is None else width - start)
        start = width - cf.shape[1]
        pos = torch.arange(first, input_ids.shape[1], device=cf.device)[None] + offsets[:, None]
        return cf[torch.arange(cf.shape[0], device=cf.device)[:, None], pos.clamp_(max=width - 1) - start]

    def generation_ids(self, context: Context | None, prompt_ids: list[int]) -> list[int]:
        """Ids to generate from: the prompt alone (no context) or `[context] [prompt]`."""
        if context is None:
            return prompt_ids
        return self.context_ids(context) + prompt_ids[self.lead:]
