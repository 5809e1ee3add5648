"""Per-record values of a run's record lines (records.jsonl): what each aggregate of summary.json averages.

The bootstrap (`eval/intervals.py`) resamples these; `compare` pairs two runs' values by case_id.
"""
from __future__ import annotations

import json
from pathlib import Path

from kedit_pl.eval.groups import CORE, GROUPS, GroupRunner, build_groups
from kedit_pl.eval.metrics import record_percent

STATES = ("pre", "post", "final")


def runner_for(lines: list[dict]) -> GroupRunner:
    """A GroupRunner for the metric groups the lines hold (their numbers need no settings)."""
    names = {n for d in lines for st in STATES for n in ((d.get(st) or {}).get("groups") or {})}
    return GroupRunner(build_groups([CORE, *sorted(n for n in names if n in GROUPS)]))


def line_values(line: dict, state: str, runner: GroupRunner) -> dict[str, float] | None:
    """One record line's values in `state` (pre, post or final); post and final include the paired group numbers.
    None when the line has no such state."""
    rec = line.get(state)
    if not rec:
        return None
    return record_percent(rec) | runner.record_numbers(rec, line.get("pre") if state != "pre" else None)


def values_by_state(lines: list[dict], runner: GroupRunner | None = None) -> dict[str, list[dict[str, float]]]:
    """{state: [values of each line that has that state]} for the states the lines hold."""
    runner = runner or runner_for(lines)
    out: dict[str, list[dict[str, float]]] = {}
    for st in STATES:
        vals = [v for d in lines if (v := line_values(d, st, runner)) is not None]
        if vals:
            out[st] = vals
    return out


def read_values(run_dir: str | Path, state: str = "post") -> dict[str, dict[str, float]] | None:
    """case_id -> values in `state`, from a run folder's records.jsonl (None without one)."""
    path = Path(run_dir) / "records.jsonl"
    if not path.is_file():
        return None
    lines = []
    for x in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(x))
        except json.JSONDecodeError:  # a torn last line of an interrupted run
            continue
    runner = runner_for(lines)
    return {str(d["case_id"]): v for d in lines if (v := line_values(d, state, runner)) is not None}
