"""Learned editors over training seeds: mean ± sd of each metric across editors trained with different `seed=`.

A run's bootstrap interval (`intervals.py`) says how sure one editor's number is over records; it says nothing about
how much another training seed would move it. `python -m kedit_pl.compare <runs> --seeds` groups the runs that
differ only in their editor's training seed and writes `seeds.md`: per group the seeds, each metric as
mean ± sd (sample sd, n − 1) over the seeds, and each seed's value.

The training seed of an edit run is read from its editor's training run (`<train run>/train_summary.json → seed`,
beside `method.checkpoint=<train run>/editor`); a run without a checkpoint has no training seed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from kedit_pl.io import read_json

#: config keys that differ between seeds of the same recipe without describing it
SEED_KEYS = ("method.checkpoint", "seed")


def training_seed(config: dict[str, Any]) -> int | None:
    """The seed of the training run whose editor `method.checkpoint` names (flattened config), or None."""
    ckpt = config.get("method.checkpoint")
    if not ckpt:
        return None
    for summary in (Path(ckpt).parent / "train_summary.json", Path(ckpt) / "train_summary.json"):
        if summary.is_file():
            seed = read_json(summary).get("seed")
            return int(seed) if seed is not None else None
    return None


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for a single value)."""
    v = list(values)
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return m, sd


def recipe(row: dict[str, Any], keys: list[str]) -> tuple:
    """What a run is apart from its seed: identity and the varying config keys other than SEED_KEYS."""
    return (row["method"], row["model"], row["dataset"], row["mode"]) + tuple(
        repr(row["config"].get(k)) for k in keys if k not in SEED_KEYS)


def seed_groups(rows: list[dict[str, Any]], keys: list[str]) -> list[list[dict[str, Any]]]:
    """Runs grouped by recipe, each group sorted by training seed; only groups with a known seed per run."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        r["train_seed"] = training_seed(r["config"])
        if r["train_seed"] is not None:
            groups.setdefault(recipe(r, keys), []).append(r)
    return [sorted(g, key=lambda r: r["train_seed"]) for g in groups.values()]


def seed_markdown(rows: list[dict[str, Any]], keys: list[str], metrics: tuple[str, ...]) -> str:
    """A table per recipe: `mean ± sd` over training seeds of each post-edit metric that every seed has, and a
    row per seed with its value. Empty when no run names an editor with a recorded seed."""
    out = []
    for group in seed_groups(rows, keys):
        cols = [m for m in metrics if all(r.get(f"post_{m}") is not None for r in group)]
        if not cols:
            continue
        head = group[0]
        out.append(f"### {head['method']} on {head['model']}, {head['dataset']}: "
                   f"{len(group)} training seed(s) ({', '.join(str(r['train_seed']) for r in group)})\n")
        out.append("| seed | n | " + " | ".join(cols) + " |")
        out.append("|---|---|" + "---|" * len(cols))
        for r in group:
            out.append(f"| {r['train_seed']} | {r['n']} | " + " | ".join(f"{r[f'post_{m}']:.1f}" for m in cols) + " |")
        stats = [mean_sd(r[f"post_{m}"] for r in group) for m in cols]
        out.append("| **mean ± sd** | | " + " | ".join(f"**{m:.1f} ± {s:.1f}**" for m, s in stats) + " |\n")
    if out:
        out.append("mean ± sample sd (n − 1) over editors trained with different `seed=`, each evaluated on the "
                   "same records; the sd is the spread between training runs, not an interval over records.\n")
    return "\n".join(out)
