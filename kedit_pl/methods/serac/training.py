"""SERAC training (Mitchell et al. 2022, §3 "Training SERAC"), as a mixin of the `Serac` LightningModule.

Scope classifier: binary cross-entropy over every (input, edit) pair of a batch; in scope: the edit's rewrite
prompt and its paraphrases, out of scope: loc/neighborhood inputs and the other edits' inputs (hard negatives).
Counterfactual model: NLL of the edit's target on its in-scope inputs, conditioned on the edit as `[edit] [input]`.
The two share no parameters, so one summed loss trains both exactly as the paper's two separate objectives.
"""
from __future__ import annotations

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.methods.serac.classifier import balanced_bce
from kedit_pl.methods.serac.scope import ScopeCounts, scope_queries
from kedit_pl.tokens import encode_targets, label_logprobs


class SeracTraining:
    """training_step / validation_step / configure_optimizers for `Serac` (uses its classifier, cf_model, cond)."""

    def on_fit_start(self) -> None:
        """Training has begun: the method may edit from here on (Lightning hook)."""
        self.ready = True

    def on_train_start(self) -> None:
        """Put the trainable parts in training mode (Lightning hook)."""
        self.train()  # Lightning keeps the modes it finds (all eval after loading); the encoder trains with dropout

    def _losses(self, batch: list[EditRequest]) -> dict[str, torch.Tensor]:
        """Classifier BCE over all (query, edit) pairs of the batch and the counterfactual NLL on in-scope queries."""
        q = scope_queries(batch, self.max_negatives)
        edits = self.classifier.embed([r.rewrite for r in batch])
        pair = self.classifier.pair_logits(self.classifier.embed(q.texts), edits)
        labels = torch.zeros_like(pair)
        inside = [j for j, o in enumerate(q.owners) if o >= 0]
        labels[inside, [q.owners[j] for j in inside]] = 1.0
        cls_loss = balanced_bce(pair, labels)
        ctx = [self.cond.context(batch[q.owners[j]].rewrite, batch[q.owners[j]].target_new) for j in inside]
        enc = encode_targets(self.tok, [q.texts[j] for j in inside],
                             [batch[q.owners[j]].target_new for j in inside]).to(self.device)
        cf = self.cond.logits(self.cf_model, ctx, enc.input_ids, enc.attention_mask)
        nll = -(label_logprobs(cf, enc.labels).sum(-1) / enc.target_mask.sum(-1)).mean()
        return {"loss": cls_loss + nll, "cls_loss": cls_loss, "cf_nll": nll, "pair_logits": pair.detach(),
                "owners": q.owners, "kinds": q.kinds}

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> torch.Tensor:
        """Classifier and counterfactual losses of one batch of edits; logs them."""
        out = self._losses(batch)
        for k in ("loss", "cls_loss", "cf_nll"):
            self.log(f"train/{k}", out[k], batch_size=len(batch), prog_bar=k == "loss")
        self.log("train/scale", self.classifier.scale, batch_size=len(batch))
        self.log("train/threshold", self.classifier.threshold, batch_size=len(batch))
        return out["loss"]

    def on_validation_epoch_start(self) -> None:
        """Start counting the classifier's validation decisions."""
        self._val = ScopeCounts()

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        """Validation losses of one batch; counts the classifier's decisions."""
        out = self._losses(batch)
        for k in ("loss", "cls_loss", "cf_nll"):
            self.log(f"val/{k}", out[k], batch_size=len(batch))
        self._val.add(torch.sigmoid(out["pair_logits"]), out["owners"], out["kinds"])

    def on_validation_epoch_end(self) -> None:
        """Log the classifier's validation precision, recall and F1."""
        for k, v in self._val.metrics().items():
            self.log(f"val/cls_{k}", v)

    def configure_optimizers(self):
        """Adam with one learning rate each for the encoder, the classifier head and the counterfactual model."""
        head = [self.classifier.log_scale, self.classifier.threshold]
        return torch.optim.Adam([
            {"params": list(self.classifier.encoder.parameters()), "lr": self.lr},
            {"params": head, "lr": self.head_lr},
            {"params": list(self.cf_model.parameters()), "lr": self.cf_lr},
        ])
