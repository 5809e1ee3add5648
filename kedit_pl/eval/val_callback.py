"""EditValidationCallback: while a learned editor trains, edit held-out records and log ES/PS/NS.

Logged as `val/es`, `val/ps`, `val/ns`, `val/score`, `val/loc_acc`, ..., and `val/edit_success`, which
checkpointing and early stopping monitor. It always includes locality, so selection never favours an editor
that flattens its neighbours (`edit_success` below): CounterFact's ES, PS, NS, zsRE's token accuracies, and
`loc_kept` = 100 · post/pre top-1 token accuracy of the unedited answers on the locality prompts (capped at
100; zsRE's NQ questions, the CounterFact train split's neighborhood prompt). The unedited scores are
measured once: the base model is frozen.
"""
from __future__ import annotations

from statistics import harmonic_mean
from typing import Callable

import lightning as L

from kedit_pl.distributed import gather_objects, rank_world, share
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests


def edit_success(m: dict[str, float]) -> float:
    """The harmonic mean of each dataset's headline edit metrics and every locality measure there is.

    With neighborhood prompts (CounterFact): ES, PS, NS (the true answer still beats the new one on neighbours)
    and loc_kept (the unedited top-1 answers on locality prompts are kept). NS alone can be fooled by an edit
    that breaks the model (both answers lose, the comparison becomes a coin flip); loc_kept cannot. Without them
    (zsRE): the token accuracies of the new answer on the rewrite and paraphrase (efficacy, generalization; ES/PS
    saturate within a hundred steps) and loc_kept. ES and PS alone when the data has no locality probe at all.
    """
    if "ns" in m or "loc_kept" not in m:
        parts = [m.get("es", 0.0), m.get("ps", m.get("es", 0.0))] + [m[k] for k in ("ns", "loc_kept") if k in m]
    else:
        parts = [m.get("rewrite_acc", 0.0), m.get("paraphrase_acc", m.get("rewrite_acc", 0.0)), m["loc_kept"]]
    return harmonic_mean(parts) if min(parts) > 0 else 0.0


def loc_kept(pre: dict[str, float], post: dict[str, float]) -> float | None:
    """100 · post/pre loc token accuracy (capped at 100); None without loc probes or with a zero baseline."""
    if pre.get("loc_acc") and "loc_acc" in post:
        return min(100.0, 100.0 * post["loc_acc"] / pre["loc_acc"])
    return None


class EditValidationCallback(L.Callback):
    """Each validation: apply the first `n_records` validation edits `edits_per_apply` at a time (1: each
    alone), score them with those edits in place, restore. Editors with a memory (SERAC) validate better
    with many edits at once: that also measures retrieval among edits, which one edit alone never tests.
    A method with `on_edit_validation(metrics)` is handed the metrics (KE's margin schedule). Under DDP the
    chunks (and the unedited requests) go round-robin to the ranks and the scores are gathered, so every rank logs
    (and checkpointing/early stopping/the margin schedule see) the same numbers over all `n_records`."""

    def __init__(self, n_records: int = 32, eval_batch_size: int = 64, edits_per_apply: int = 1) -> None:
        if edits_per_apply < 1:
            raise ValueError(f"train.val_edits_per_apply: must be >= 1, got {edits_per_apply}")
        self.n_records = n_records
        self.eval_batch_size = eval_batch_size
        self.edits_per_apply = edits_per_apply
        self.pre: dict[str, float] | None = None  # unedited metrics of the validation edits

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        requests = trainer.datamodule.val_requests[: self.records_to_score(trainer)]
        chunks = [requests[s:s + self.edits_per_apply] for s in range(0, len(requests), self.edits_per_apply)]
        was_training = pl_module.training
        pl_module.eval()
        if self.pre is None:
            self.pre = summarize(self._gathered(trainer, [requests[s:s + self.eval_batch_size] for s in
                                                          range(0, len(requests), self.eval_batch_size)],
                                                lambda chunk: self._score(pl_module, chunk)))

        def edited(chunk: list) -> list[dict]:
            handle = pl_module.apply(chunk)
            try:
                return self._score(pl_module, chunk)
            finally:
                pl_module.restore(handle)

        post = self._gathered(trainer, chunks, edited)
        pl_module.train(was_training)
        m = summarize(post)
        m.pop("n_records", None)
        if (kept := loc_kept(self.pre, m)) is not None:
            m["loc_kept"] = kept
        m["edit_success"] = edit_success(m)
        for k, v in m.items():
            pl_module.log(f"val/{k}", v, prog_bar=k in ("es", "ps", "edit_success"), sync_dist=True)  # equal on all ranks
        if hasattr(pl_module, "on_edit_validation"):
            pl_module.on_edit_validation(m)

    def records_to_score(self, trainer: L.Trainer) -> int:
        """`n_records`, capped at the validation batches Lightning runs (`trainer.fast_dev_run`: one batch;
        `trainer.limit_val_batches`: that many), so a fast dev run is fast."""
        batches = getattr(trainer, "num_val_batches", None)
        per_batch = getattr(trainer.datamodule, "train_batch_size", None)
        if not batches or not per_batch:
            return self.n_records
        return min(self.n_records, int(sum(batches)) * int(per_batch))

    def _score(self, pl_module, chunk: list) -> list[dict]:
        return score_requests(pl_module.logits_fn(), pl_module.tok, chunk, self.eval_batch_size, pl_module.device)

    @staticmethod
    def _gathered(trainer: L.Trainer, chunks: list[list], fn: Callable[[list], list[dict]]) -> list[dict]:
        """fn over the chunks, round-robin over the ranks (all of them without DDP), gathered in chunk order."""
        scored = {i: fn(chunks[i]) for i in share(range(len(chunks)), *rank_world(trainer))}
        for part in gather_objects(getattr(trainer, "strategy", None), scored):
            scored |= part
        return [rec for i in range(len(chunks)) for rec in scored[i]]
