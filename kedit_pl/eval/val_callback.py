"""EditValidationCallback: while a learned editor trains, edit held-out records and log ES/PS/NS.

Logged as `val/es`, `val/ps`, `val/ns`, `val/score`, `val/loc_acc`, and `val/edit_success`, which
checkpointing and early stopping monitor: the harmonic mean of ES, PS and NS when the data has
neighborhood prompts (CounterFact), else the mean of ES and PS (zsRE).
"""
from __future__ import annotations

from statistics import harmonic_mean

import lightning as L

from kedit_pl.distributed import gather_objects, rank_world, share
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests


def edit_success(m: dict[str, float]) -> float:
    if "ns" in m:
        return harmonic_mean([m["es"], m["ps"], m["ns"]]) if min(m["es"], m["ps"], m["ns"]) > 0 else 0.0
    return (m.get("es", 0.0) + m.get("ps", m.get("es", 0.0))) / 2


class EditValidationCallback(L.Callback):
    """Each validation: apply the first `n_records` validation edits `edits_per_apply` at a time (1: each
    alone), score them with those edits in place, restore. Editors with a memory (SERAC) validate better
    with many edits at once: that also measures retrieval among edits, which one edit alone never tests.
    Under DDP the chunks go round-robin to the ranks and the scores are gathered, so every rank logs (and
    checkpointing/early stopping see) the same numbers over all `n_records`."""

    def __init__(self, n_records: int = 32, eval_batch_size: int = 64, edits_per_apply: int = 1) -> None:
        if edits_per_apply < 1:
            raise ValueError(f"train.val_edits_per_apply: must be >= 1, got {edits_per_apply}")
        self.n_records = n_records
        self.eval_batch_size = eval_batch_size
        self.edits_per_apply = edits_per_apply

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        requests = trainer.datamodule.val_requests[: self.n_records]
        chunks = [requests[s:s + self.edits_per_apply] for s in range(0, len(requests), self.edits_per_apply)]
        was_training = pl_module.training
        pl_module.eval()
        scored: dict[int, list[dict]] = {}
        for i in share(range(len(chunks)), *rank_world(trainer)):
            handle = pl_module.apply(chunks[i])
            try:
                scored[i] = score_requests(pl_module.logits_fn(), pl_module.tok, chunks[i], self.eval_batch_size,
                                           pl_module.device)
            finally:
                pl_module.restore(handle)
        pl_module.train(was_training)
        for part in gather_objects(getattr(trainer, "strategy", None), scored):
            scored |= part
        post = [rec for i in range(len(chunks)) for rec in scored[i]]
        m = summarize(post)
        m.pop("n_records", None)
        m["edit_success"] = edit_success(m)
        for k, v in m.items():
            pl_module.log(f"val/{k}", v, prog_bar=k in ("es", "ps", "edit_success"), sync_dist=True)  # equal on all ranks
