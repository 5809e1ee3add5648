"""KnowledgeEditor (De Cao et al. 2021, "Editing Factual Knowledge in Language Models").

Editing (`compute_edit`, in `learned.py`): the fine-tuning gradient ∇W of the edit loss (NLL of target_new after
the rewrite prompt) for each edited matrix, and a condition vector of "{prediction} >> {alternative} || {input}"
(here: "{target_true} >> {target_new} || {rewrite}"; the request's current answer stands for the model's
prediction), go through the trained hypernetwork (`ke_net.py`): ΔW = max_scale · σ(η) · (∇W ⊙ a + b).

Training (`training_step`, via train.py): the base model stays frozen; the hypernetwork learns the constrained
objective of KE §3.3,
    min_φ  CE(alternative | x, paraphrase)   s.t.   KL(p_θ(·|x') ‖ p_θ̃(·|x')) ≤ margin      (x' locality inputs)
as the Lagrangian  L = CE + α · (KL − margin), with α ≥ 0 updated by gradient *ascent* (its gradient is negated
in `on_before_optimizer_step`, and it is clamped at 0 after each step). The margin shrinks ×`margin_decay` (down
to `margin_min`) each validation whose edit success (`margin_metric`, KE: the share of flipped predictions) passes
`margin_above`. Locality inputs: zsRE's NQ question, or CounterFact's neighborhood prompt (same relation, other
subject); `loc_loss=nll` swaps the KL for the NLL of the unedited answer.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.methods.ke_net import KEConfig, KnowledgeEditorNet
from kedit_pl.methods.learned import Factors, LearnedEditor, rephrase
from kedit_pl.tokens import pad_id, right_pad

log = logging.getLogger(__name__)


class KE(LearnedEditor):
    """A learned editor: `train.py method=ke` trains it, `edit.py method=ke method.checkpoint=PATH` uses it."""

    KIND, CONFIG = "ke", KEConfig

    def __init__(self, model=None, tokenizer=None, spec=None, *, layers: Sequence[int] = (),
                 modules: Sequence[str] = ("mlp_in", "mlp_out"), lstm_dim: int = 128, condition_dim: int = 1024,
                 hidden_dim: int = 128, max_scale: float = 10.0, lr: float = 3e-4,
                 lr_alpha: float = 1e-1, alpha_init: float = 1.0, margin_max: float = 1e-3,
                 margin_min: float = 1e-5, margin_decay: float = 0.8, margin_metric: str = "rewrite_acc",
                 margin_above: float = 90.0, loc_loss: str = "kl", loc_prompts: int = 1,
                 checkpoint: str | None = None, name: str = "ke") -> None:
        super().__init__(model, tokenizer, spec, layers=layers, modules=modules, loc_loss=loc_loss,
                         loc_prompts=loc_prompts)
        if min(lstm_dim, condition_dim, hidden_dim) < 1 or max_scale <= 0:
            raise ConfigError(f"method.lstm_dim/condition_dim/hidden_dim must be >= 1 and max_scale > 0; got "
                              f"{lstm_dim}/{condition_dim}/{hidden_dim}, max_scale={max_scale}")
        if min(lr, lr_alpha) <= 0 or alpha_init < 0 or not 0 < margin_min <= margin_max or not 0 < margin_decay <= 1:
            raise ConfigError(f"method.lr/lr_alpha must be > 0, alpha_init >= 0, 0 < margin_min <= margin_max and "
                              f"0 < margin_decay <= 1; got lr={lr}, lr_alpha={lr_alpha}, alpha_init={alpha_init}, "
                              f"margin_min={margin_min}, margin_max={margin_max}, margin_decay={margin_decay}")
        self.lr, self.lr_alpha, self.alpha_init = lr, lr_alpha, alpha_init
        self.margin_max, self.margin_min, self.margin_decay = margin_max, margin_min, margin_decay
        self.margin_metric, self.margin_above = margin_metric, margin_above
        embed_dim = self.model.get_input_embeddings().weight.shape[1]
        cfg = KEConfig(params=self._params(), embed_dim=embed_dim, lstm_dim=lstm_dim, condition_dim=condition_dim,
                       hidden_dim=hidden_dim, max_scale=max_scale)
        self._init_editor(cfg, checkpoint)

    def build_editor(self, cfg: KEConfig) -> KnowledgeEditorNet:
        """KE's editor network for `cfg`."""
        return KnowledgeEditorNet(cfg, alpha_init=self.alpha_init, margin=self.margin_max)

    # --- the update ------------------------------------------------------------------------------------
    def condition(self, requests: list[EditRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        """The LM's (frozen) token embeddings of "{prediction} >> {alternative} || {input}" and their mask."""
        texts = [f"{r.target_true} >> {r.target_new} || {r.rewrite}" for r in requests]
        ids, mask = right_pad([self.tok(t, add_special_tokens=False)["input_ids"] for t in texts], pad_id(self.tok))
        with torch.no_grad():
            embeds = self.model.get_input_embeddings()(ids.to(self.device))
        return embeds, mask.to(self.device)

    def request_deltas(self, requests: list[EditRequest], factors: Factors, mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """ΔW_b = max_scale · σ(η_b) · (∇W_b ⊙ a_b + b_b) with each request's own gradient ∇W_b = Σ_t δ_bt u_btᵀ."""
        grads = {p: torch.einsum("bto,bti->boi", d, u) for p, (u, d) in factors.items()}
        return self.editor(*self.condition(requests), grads)

    # --- training --------------------------------------------------------------------------------------
    def losses(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """KE's Lagrangian CE + α·(KL − margin) (§3.3), each request under its own edit. CE is on the edit's
        input and its paraphrase, as the reference code's `use_views`."""
        nll_pre, factors, mask = self.gradient_factors(requests)
        deltas = self.request_deltas(requests, factors, mask)
        rows = [(i, r.rewrite, r.target_new) for i, r in enumerate(requests)]
        rows += [(i, rephrase(r), r.target_new) for i, r in enumerate(requests) if r.paraphrases]
        ce, acc = self.edited_nll(rows, deltas)
        loc = self.locality_loss(requests, deltas)
        alpha, margin = self.editor.lagrange, self.editor.margin
        return {"loss": ce.mean() + alpha * (loc - margin), "edit_loss": ce.mean(),
                "edit_acc": acc, "loc_loss": loc, "rewrite_nll_pre": nll_pre.mean(),
                "lagrange": alpha.detach(), "margin": margin.clone()}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Gradient ascent on the Lagrange multiplier: the optimizer's descent step then raises α while KL > margin.
        Here, once per step, after gradient accumulation and DDP's all-reduce (after each backward, accumulated
        micro-batches would flip each other's sign)."""
        grad = self.editor.lagrange.grad
        if grad is not None:
            grad.neg_()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            self.editor.lagrange.clamp_(min=0.0)

    def on_edit_validation(self, metrics: dict[str, float]) -> None:
        """Called by EditValidationCallback: shrink the KL margin once validation edits succeed (KE's schedule)."""
        value = metrics.get(self.margin_metric)
        if value is not None and value > self.margin_above:
            self.editor.margin.fill_(max(float(self.editor.margin) * self.margin_decay, self.margin_min))
        self.log("val/margin", float(self.editor.margin))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        nets = [p for n, p in self.editor.named_parameters() if n != "lagrange"]
        return torch.optim.Adam([{"params": nets, "lr": self.lr}, {"params": [self.editor.lagrange], "lr": self.lr_alpha}])
