"""The contract of a metric group: which record fields it needs, what it measures, and pure numbers from that.

A group measures one model state (the unedited model, or the model right after an edit) and returns JSON-able
raw measurements (scores or generations); `numbers` turns one raw measurement into report-scale numbers with no
model in sight, so a test can check them by hand. Records that lack a group's fields are skipped and counted
(`problem` says why), never given a made-up value.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from statistics import mean
from typing import Any, ClassVar, Iterable, Iterator

from kedit_pl.data.requests import EditRequest


class MetricGroup(ABC):
    """One metric group. `per_record` groups measure each edited record; the others measure a model state."""

    name: ClassVar[str]
    #: EditRequest fields a record must have (non-empty) to be measured
    fields: ClassVar[tuple[str, ...]] = ()
    per_record: ClassVar[bool] = True
    #: measures many edited states in one batched pass (`measure_states`): the single-edit protocol then defers it
    shares_forward: ClassVar[bool] = False

    def __init__(self, **settings: Any) -> None:
        self.settings = settings

    def problem(self, req: EditRequest, tok) -> str | None:
        """Why `req` cannot be measured by this group (None: it can)."""
        missing = [f for f in self.fields if not getattr(req, f)]
        return f"no {missing[0]}" if missing else None

    def due(self, mode: str, batch_idx: int) -> bool:
        """Whether a model-state group measures the state after batch `batch_idx` (per-record groups: always)."""
        return True

    @abstractmethod
    def measure(self, method, requests: list[EditRequest]) -> list[dict]:
        """Raw measurements of the current model state, one per request (all of them measurable).
        `method` is the EditMethod: its `logits_fn()`, `model`, `tok` and `device`."""

    def prompts(self, req: EditRequest) -> list[str]:
        """The prompts `measure_states` generates from for `req` (groups with `shares_forward`)."""
        raise NotImplementedError(f"metric group {self.name} measures one model state at a time")

    def measure_states(self, method, requests: list[EditRequest], systems: list) -> list[dict]:
        """`measure` of each request on its own edited system (`kedit_pl.eval.row_states.EditedSystem`), with
        every edit undone; only groups with `shares_forward`."""
        raise NotImplementedError(f"metric group {self.name} measures one model state at a time")

    @staticmethod
    @abstractmethod
    def numbers(raw: dict) -> dict[str, float]:
        """Report-scale numbers (percent for rates) of one raw measurement: pure."""

    @staticmethod
    def paired(pre: dict, post: dict) -> dict[str, float]:
        """Numbers that compare a record's post-edit measurement with its pre-edit one (post only); pure."""
        return {}


def mean_numbers(per: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each number over the measurements that have it."""
    per = list(per)
    names = sorted({k for m in per for k in m})
    return {k: mean(m[k] for m in per if k in m) for k in names}


@contextmanager
def stopwatch(clock: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the seconds the block took to `clock[name]` (nothing when `clock` is None): where evaluation time goes."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if clock is not None:
            clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
