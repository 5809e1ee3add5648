"""Evaluate a sweep's best trial once on the test split.

    python -m kedit_pl.sweep_test <sweep dir> [--limit 200] [--metric post/score] [--out DIR] [overrides...]

A sweep (`hparams_search=...`, or a multirun such as the ROME layer sweep with `dataset.split=dev`) chooses on dev.
This picks its best trial by the metric (default: the trials' `optimized_metric`, larger is better), reruns that
trial's command-line overrides with `dataset.split=test dataset.limit=N` (and any extra overrides) into
`<sweep dir>/test_best` (or `--out`), and writes `sweep_test.json` there beside the run: the trial, its dev figure
and the test figure, each `mean [lo, hi]`. A sweep whose trials did not all run on dev is refused: its best trial
would be judged on the records it was chosen on.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from kedit_pl.errors import ConfigError, KEditError
from kedit_pl.io import read_json, write_json

#: trial overrides that select records or place outputs: replaced for the test run
REPLACED = ("dataset.split=", "dataset.limit=", "dataset.range=", "dataset.ids=", "hydra.", "paths.output_dir=",
            "edit.resume=", "edit.overwrite=")


def trials(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every finished trial of the sweep: its folder, summary, config and command-line overrides."""
    from omegaconf import OmegaConf

    found = []
    for s in sorted(sweep_dir.rglob("summary.json")):
        run = s.parent
        hydra_dir = run / ".hydra"
        if run.name == "test_best" or not (hydra_dir / "overrides.yaml").is_file():
            continue
        found.append({"dir": run, "summary": read_json(s),
                      "config": OmegaConf.to_container(OmegaConf.load(hydra_dir / "config.yaml"), resolve=False)
                      if (hydra_dir / "config.yaml").is_file() else {},
                      "overrides": [str(o) for o in OmegaConf.load(hydra_dir / "overrides.yaml")]})
    return found


def metric_of(summary: dict, metric: str) -> tuple[float | None, list[float] | None]:
    """`'post/score'` -> (`summary['post']['score']`, its interval)."""
    group, _, name = metric.partition("/")
    return (summary.get(group) or {}).get(name), ((summary.get("ci") or {}).get(group) or {}).get(name)


def best_trial(found: list[dict], metric: str | None) -> tuple[dict, str]:
    """The trial with the largest `metric` (default: the trials' optimized_metric); every trial must be on dev."""
    if not found:
        raise ConfigError("sweep_test: no finished trial (summary.json with .hydra/overrides.yaml) in the sweep folder")
    off_dev = [t for t in found if t["summary"].get("run", {}).get("split") != "dev"]
    if off_dev:
        split = off_dev[0]["summary"].get("run", {}).get("split", "all")
        raise ConfigError(f"sweep_test: trial {off_dev[0]['dir']} ran on dataset.split={split}, not dev; sweep with "
                          f"dataset.split=dev so the test records stay unseen")
    metric = metric or found[0]["config"].get("optimized_metric") or "post/score"
    scored = [t for t in found if metric_of(t["summary"], metric)[0] is not None]
    if not scored:
        raise ConfigError(f"sweep_test: no trial reports {metric}")
    return max(scored, key=lambda t: metric_of(t["summary"], metric)[0]), metric


def overrides_for_test(trial: dict, limit: int | None, extra: list[str], out: Path) -> list[str]:
    """The best trial's overrides, moved onto the test split (split, limit and output folder replaced)."""
    kept = [o for o in trial["overrides"] if not o.lstrip("+~").startswith(REPLACED)]
    return [*kept, "dataset.split=test", f"dataset.limit={'null' if limit is None else limit}", *extra,
            f"paths.output_dir={out}"]


def run_sweep_test(sweep_dir: Path, limit: int | None = 200, metric: str | None = None, out: Path | None = None,
                   extra: list[str] | None = None) -> dict[str, Any]:
    """Rerun the best dev trial on test; returns (and writes) sweep_test.json."""
    from kedit_pl.config import compose
    from kedit_pl.pipeline import run_edit

    best, metric = best_trial(trials(sweep_dir), metric)
    out = out or sweep_dir / "test_best"
    overrides = overrides_for_test(best, limit, list(extra or []), out)
    summary = run_edit(compose("edit", overrides))
    (dev, dev_ci), (test, test_ci) = metric_of(best["summary"], metric), metric_of(summary, metric)
    result = {"metric": metric, "best_trial": str(best["dir"]),
              "dev": {"value": dev, "ci": dev_ci, "n": best["summary"].get("timing", {}).get("n_edits"),
                      "records_sha256": best["summary"].get("run", {}).get("records_sha256")},
              "test": {"value": test, "ci": test_ci, "n": summary.get("timing", {}).get("n_edits"),
                       "records_sha256": summary.get("run", {}).get("records_sha256")},
              "command": "python edit.py " + " ".join(o for o in overrides if not o.startswith("paths.output_dir="))}
    write_json(out / "sweep_test.json", result)
    return result


def _fmt(part: dict) -> str:
    ci = f" [{part['ci'][0]:.1f}, {part['ci'][1]:.1f}]" if part.get("ci") else ""
    return f"{part['value']:.1f}{ci} on {part['n']} records"


def main(argv: list[str] | None = None) -> None:
    """Command line: evaluate a dev sweep's best trial once on test and write sweep_test.json."""
    import logging

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    ap = argparse.ArgumentParser(prog="python -m kedit_pl.sweep_test", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path, help="the sweep's folder (hydra.sweep.dir)")
    ap.add_argument("--limit", type=int, default=200, help="test records (default 200; 0: all of the test split)")
    ap.add_argument("--metric", default=None, help="the metric that picks the best trial (default: optimized_metric)")
    ap.add_argument("--out", type=Path, default=None, help="the test run's folder (default: <sweep dir>/test_best)")
    ap.add_argument("overrides", nargs="*", help="extra overrides for the test run (e.g. logger=csv)")
    args = ap.parse_intermixed_args(argv)  # options before or after the overrides (`DIR --limit 200 logger=csv`)
    try:
        r = run_sweep_test(args.sweep_dir, args.limit or None, args.metric, args.out, args.overrides)
    except KEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"best trial {r['best_trial']} by {r['metric']}: dev {_fmt(r['dev'])}; test {_fmt(r['test'])}\n"
          f"rerun: {r['command']}")


if __name__ == "__main__":
    main()
