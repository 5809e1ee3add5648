"""Metric groups beyond ES/PS/NS, selected by `eval.metrics` and run by the evaluation callback.

    eval.metrics=[es_ps_ns,fluency,portability,distracting,alias,general]

Each group is one module (`fluency.py`, `scored.py`, `general.py`) implementing `base.MetricGroup`. The runner
below measures the selected groups on a model state, stores raw measurements in each record line
(`pre/post/final -> groups -> <name>`, or `groups_skipped -> <name>: reason`), and turns them into summary
numbers. Adding a group = a class + one line in GROUPS.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.groups.base import MetricGroup, mean_numbers, stopwatch
from kedit_pl.eval.groups.fluency import Fluency
from kedit_pl.eval.groups.general import GeneralAbility
from kedit_pl.eval.groups.scored import DistractingNeighborhood, Portability, SubjectAlias

if TYPE_CHECKING:
    from kedit_pl.eval.pre_cache import PreCache

#: ES/PS/NS (and the token accuracies) are the callback's own scoring; every run measures them
CORE = "es_ps_ns"
GROUPS: dict[str, type[MetricGroup]] = {g.name: g for g in (Fluency, Portability, DistractingNeighborhood,
                                                             SubjectAlias, GeneralAbility)}


def build_groups(names: list[str] | tuple[str, ...], settings: Mapping[str, Any] | None = None) -> list[MetricGroup]:
    """The groups named in `eval.metrics`, each with its `eval.<name>` settings."""
    names = list(names or [CORE])
    unknown = [n for n in names if n != CORE and n not in GROUPS]
    if unknown:
        raise ConfigError(f"eval.metrics: unknown metric group {unknown[0]!r}; choose from {[CORE, *GROUPS]}")
    if CORE not in names:
        raise ConfigError(f"eval.metrics: {CORE} is measured by every run and cannot be left out; got {names}")
    settings = settings or {}
    return [GROUPS[n](**dict(settings.get(n) or {})) for n in dict.fromkeys(names) if n != CORE]


class GroupRunner:
    """Measures the selected groups on the current model state and summarizes what the records hold."""

    def __init__(self, groups: list[MetricGroup], mode: str = "single") -> None:
        self.groups = groups
        self.mode = mode

    def shared_forward(self) -> list[str]:
        """Names of the selected groups that can measure many edited states in one forward (`shares_forward`)."""
        return [g.name for g in self.groups if g.per_record and g.shares_forward]

    def shared_prompts(self, req: EditRequest) -> list[str]:
        """The prompts the `shared_forward` groups generate from for `req` (what `row_states.capture` routes)."""
        return [p for g in self.groups if g.name in self.shared_forward() for p in g.prompts(req)]

    def _measurable(self, g: MetricGroup, method, requests: list[EditRequest],
                    records: list[dict]) -> list[tuple[int, EditRequest, dict]]:
        """(position, request, record) of the requests `g` can measure; the others get `groups_skipped` (why)."""
        ok = []
        for i, (req, rec) in enumerate(zip(requests, records)):
            why = g.problem(req, method.tok)
            if why is None:
                ok.append((i, req, rec))
            else:
                rec.setdefault("groups_skipped", {})[g.name] = why
        return ok

    def measure(self, method, requests: list[EditRequest], records: list[dict], batch_idx: int | None = None,
                cache: "PreCache | None" = None, state: bool = True, skip: tuple[str, ...] = (),
                clock: dict[str, float] | None = None) -> None:
        """Add each group's raw measurement (or why it skipped) to `records` (aligned with `requests`).
        A model-state group (general ability) goes into the first record only, when it is due; `batch_idx`
        None means always (the unedited model, the final state). `cache` (unedited model only) holds
        measurements of earlier runs, keyed by the weights, the record and the group's settings. `state=False`:
        per-record groups only (another DDP rank measures this model state). Groups named in `skip` are left for
        `measure_states`. `clock` (group name -> seconds) gains the time each group took."""
        for g in self.groups:
            if g.name in skip:
                continue
            with stopwatch(clock, g.name):
                self._measure_one(g, method, requests, records, batch_idx, cache, state)

    def _measure_one(self, g: MetricGroup, method, requests: list[EditRequest], records: list[dict],
                     batch_idx: int | None, cache: "PreCache | None", state: bool) -> None:
        key, what = {"group": g.name, **g.settings}, f"pre-edit {g.name}"
        if not g.per_record:
            if state and records and (batch_idx is None or g.due(self.mode, batch_idx)):
                compute = lambda: g.measure(method, requests)[0]  # noqa: E731
                records[0].setdefault("groups", {})[g.name] = (cache.state(key, compute, what) if cache is not None
                                                               else compute())
            return
        ok = self._measurable(g, method, requests, records)
        if ok:
            reqs = [r for _, r, _ in ok]
            compute = lambda reqs: g.measure(method, reqs)  # noqa: E731
            raws = cache.per_record(key, reqs, compute, what) if cache is not None else compute(reqs)
            for (_, _, rec), raw in zip(ok, raws):
                rec.setdefault("groups", {})[g.name] = raw

    def measure_states(self, method, requests: list[EditRequest], records: list[dict], systems: list,
                       clock: dict[str, float] | None = None) -> None:
        """The `shared_forward` groups of each request on its own edited system (`eval/row_states.py`), all in
        shared batches, with every edit undone; into `records` as `measure` puts them."""
        for g in self.groups:
            if g.name not in self.shared_forward():
                continue
            ok = self._measurable(g, method, requests, records)
            if not ok:
                continue
            with stopwatch(clock, g.name):
                raws = g.measure_states(method, [r for _, r, _ in ok], [systems[i] for i, _, _ in ok])
                for (_, _, rec), raw in zip(ok, raws):
                    rec.setdefault("groups", {})[g.name] = raw

    def summarize(self, records: list[dict], pre: list[dict] | None = None) -> dict[str, float]:
        """Mean numbers of every group over the records measured; with `pre` (aligned), also the paired ones."""
        out: dict[str, float] = {}
        for g in self.groups:
            idx = [i for i, r in enumerate(records) if g.name in (r or {}).get("groups", {})]
            out.update(mean_numbers(g.numbers(records[i]["groups"][g.name]) for i in idx))
            if pre is not None:
                both = [i for i in idx if g.name in (pre[i] or {}).get("groups", {})]
                out.update(mean_numbers(g.paired(pre[i]["groups"][g.name], records[i]["groups"][g.name]) for i in both))
        return out

    def record_numbers(self, record: dict | None, pre: dict | None = None) -> dict[str, float]:
        """One record's numbers of every per-record group (with `pre`, the paired ones too): the values whose
        means `summarize` reports, for the bootstrap. Model-state groups (general ability) have none per record."""
        out: dict[str, float] = {}
        for g in self.groups:
            raw = (record or {}).get("groups", {}).get(g.name)
            if not g.per_record or raw is None:
                continue
            out.update(g.numbers(raw))
            pre_raw = (pre or {}).get("groups", {}).get(g.name)
            if pre is not None and pre_raw is not None:
                out.update(g.paired(pre_raw, raw))
        return out

    def counts(self, done: list[dict]) -> dict[str, dict[str, Any]]:
        """Per group, over the record lines: records measured and skipped (and why) on the unedited model;
        for a model-state group, how many states it measured (pre, post, final)."""
        out = {}
        for g in self.groups:
            if not g.per_record:
                out[g.name] = {f"states_{st}": sum(g.name in (d.get(st) or {}).get("groups", {}) for d in done)
                               for st in ("pre", "post", "final") if any(st in d for d in done)}
                continue
            pres = [d["pre"] for d in done]
            reasons = Counter(r.get("groups_skipped", {}).get(g.name) for r in pres)
            reasons.pop(None, None)
            out[g.name] = {"measured": sum(g.name in r.get("groups", {}) for r in pres),
                           "skipped": sum(reasons.values()), "skipped_because": dict(reasons)}
        return out
