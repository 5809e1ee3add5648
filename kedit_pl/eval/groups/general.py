"""General ability: perplexity of a fixed WikiText-2 validation slice (`eval/perplexity.py`), per model state.

It is what shows collapse under mass and sequential editing. It is measured once on the unedited model, once
after every batch in batch/sequential mode (and after the last edit: `final`), and in single mode after the
edits of the first `single_records` records only (each single edit is restored before the next, so the
state differs per record, and 20k tokens per record would cost more than the edit itself); null measures every
record. SERAC leaves the base model untouched and routes out-of-scope text to it, so its perplexity is the base
model's by construction. A state whose weights are bit for bit ones already measured in this run, with no hook on
the model, reuses that measurement: IKE and SERAC never change the base model, so each of their states costs a
weights digest (about 0.5 s) instead of a 20k-token pass. Any other state starts its pass at the lowest block
the edit touched, from the hidden states kept there on an earlier state with the same weights below
(`eval/block_inputs.py`): GRACE at block 24 or MEND at 27 of smollm2's 30 run a fifth of the model, bit for bit.
"""
from __future__ import annotations

from kedit_pl.data.requests import EditRequest
from kedit_pl.digests import weights_digest
from kedit_pl.eval.block_inputs import BlockInputs
from kedit_pl.eval.groups.base import MetricGroup
from kedit_pl.eval.perplexity import perplexity
from kedit_pl.eval.scoring import hooked


class GeneralAbility(MetricGroup):
    """General ability: perplexity of the (edited) model on a WikiText slice, measured once per run, not per record."""
    name = "general"
    per_record = False

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self._by_weights: dict[str, float] = {}  # weights digest -> perplexity, of the states this run measured
        self._lower = BlockInputs()  # the hidden states entering the lowest touched block, over the WikiText windows

    def measure(self, method, requests: list[EditRequest]) -> list[dict]:
        if hooked(method.model):  # hooks may change the outputs of unchanged weights (GRACE, WISE)
            return [{"ppl": self._perplexity(method)}]
        key = weights_digest(method.model)
        if key not in self._by_weights:
            self._by_weights[key] = self._perplexity(method)
        return [{"ppl": self._by_weights[key]}]

    def _perplexity(self, method) -> float:
        s = self.settings
        with self._lower.for_method(method):
            return perplexity(method.model, method.tok, s["corpus"], int(s.get("n_tokens", 20_000)),
                              int(s.get("seq_len", 512)), int(s.get("batch_size", 4)))

    def due(self, mode: str, batch_idx: int) -> bool:
        """Whether the state after batch `batch_idx` is measured (see the module docstring)."""
        limit = self.settings.get("single_records", 5)
        return mode != "single" or limit is None or batch_idx < int(limit)

    @staticmethod
    def numbers(raw: dict) -> dict[str, float]:
        return {"ppl": float(raw["ppl"])}
