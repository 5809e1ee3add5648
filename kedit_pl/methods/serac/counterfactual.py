"""SERAC's counterfactual model h_ψ(z_e, x) (Mitchell et al. 2022, §3): a small causal LM that reads the edit
as a text prefix, `[edit] [input]`, and is fine-tuned to answer the input as the edit says.

The prefix is `context_template` filled with the edit (default "{prompt} {target}\n"). An input row of the
base model (right-padded ids, possibly starting with the tokenizer's BOS) becomes
    prefix ids + the row without its leading special tokens,
and the counterfactual logits are read back at the positions of the original row, so they have exactly the
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


def leading_specials(tok: PreTrainedTokenizerBase) -> int:
    """How many special tokens the tokenizer puts before a text (e.g. 1 for a BOS-adding tokenizer)."""
    plain = tok("a", add_special_tokens=False)["input_ids"]
    full = tok("a")["input_ids"]
    n = len(full) - len(plain)
    if n < 0 or full[n:] != plain:
        raise ConfigError("model tokenizer adds special tokens after the text; SERAC's conditioning supports "
                          "leading special tokens (BOS) only")
    return n


class Conditioner:
    """Builds `[edit] [input]` batches for the counterfactual model and aligns its logits to the input rows."""

    def __init__(self, tok: PreTrainedTokenizerBase, template: str = "{prompt} {target}\n") -> None:
        try:
            template.format(prompt="p", target="t")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"method.context_template: {template!r} must use only {{prompt}} and {{target}} ({e})") from None
        self.tok = tok
        self.template = template
        self.lead = leading_specials(tok)

    def context(self, prompt: str, target: str) -> str:
        """The edit z_e as text."""
        return self.template.format(prompt=prompt, target=target)

    def batch(self, contexts: list[str], input_ids: torch.Tensor,
              lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded conditioned ids, their mask, and each row's offset (see module doc)."""
        rows, offsets = [], []
        for ctx, row, n in zip(contexts, input_ids.tolist(), lengths):
            pre = self.tok(ctx)["input_ids"]
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

    def logits(self, model: nn.Module, contexts: list[str], input_ids: torch.Tensor,
               attention_mask: torch.Tensor, keep: int | None = None) -> torch.Tensor:
        """Counterfactual logits aligned to `input_ids`' positions (padding positions: arbitrary).

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

    def generation_ids(self, context: str | None, prompt_ids: list[int]) -> list[int]:
        """Ids to generate from: the prompt alone (base model) or `[edit] [prompt]` (counterfactual model)."""
        if context is None:
            return prompt_ids
        return self.tok(context)["input_ids"] + prompt_ids[self.lead:]
