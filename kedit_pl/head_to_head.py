"""Head to head: every method family on the same model, records and evaluation, then one comparison.

    python -m kedit_pl.head_to_head [hydra overrides...]      (conf/experiment/head_to_head.yaml)

Resumable: a method whose run folder holds the summary.json of a run with these exact settings (its run.json) is
complete and is not rerun; a folder with records but no summary (an interrupted run; a sequential one from its last
checkpoint), or a finished run of a smaller dataset.limit, continues with edit.resume=true. A folder holding a run
with other settings (seed, method hyperparameters, model, records...) is refused before anything runs.
Learned editors (MEND, SERAC, any method with `trainable = True`) use `head_to_head.checkpoints.<name>`; without one they are skipped
with a message, or trained first (`head_to_head.train_missing=true`, with `head_to_head.train.<name>`).
With `trainer.devices=N trainer.strategy=ddp` each method runs as a `kedit-edit` child process over N ranks (its
output in <out_dir>/<method>.log).
"""
from __future__ import annotations

import logging
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from kedit_pl.config import REPO_ROOT, compose
from kedit_pl.distributed import requested_devices
from kedit_pl.entry import Interrupted, interrupts
from kedit_pl.errors import ConfigError, DifferentRecords, KEditError
from kedit_pl.io import read_json, write_json
from kedit_pl.run_folder import edit_batch_size, identity_difference, is_finished_run_of, result_files, run_identity

log = logging.getLogger("kedit_pl.head_to_head")
EXPERIMENT = "experiment=head_to_head"


def is_complete(run_dir: Path, identity: dict[str, Any]) -> bool:
    """`run_dir` holds the finished run of exactly these settings (run.json), not one of others."""
    return is_finished_run_of(run_dir, identity)


def _planned_checkpoint(name: str, h: DictConfig, out: Path) -> str | None:
    """The editor a learned method will use: the given checkpoint, or the one train_missing trains (None: skipped)."""
    ckpt = (h.get("checkpoints") or {}).get(name)
    if ckpt:
        return str(ckpt)
    return str(out / "_train" / name / "editor") if h.get("train_missing") else None


def plan_runs(overrides: list[str], h: DictConfig, out: Path) -> dict[str, tuple[list[str], dict] | None]:
    """Per method: (its extra overrides, its run identity), None for a learned editor without a checkpoint. Refuses,
    in one line and before anything runs, an out_dir whose method folders hold runs with other settings."""
    plans: dict[str, tuple[list[str], dict] | None] = {}
    for name in h.methods:
        run_dir = out / name
        extra = list((h.get("overrides") or {}).get(name, []))
        mcfg = compose("edit", [EXPERIMENT, *overrides, f"method={name}", *extra, "paths.output_dir=/dev/null"])
        if _trainable(mcfg):
            ckpt = _planned_checkpoint(name, h, out)
            if ckpt is None:
                plans[name] = None
                continue
            extra.append(f"method.checkpoint={ckpt}")
        cfg = compose("edit", [EXPERIMENT, *overrides, f"method={name}", *extra, f"paths.output_dir={run_dir}"])
        identity = run_identity(cfg, edit_batch_size(cfg))
        if result_files(run_dir):
            diff = identity_difference(run_dir, identity)
            if diff:
                raise ConfigError(f"head_to_head.out_dir: {run_dir} holds a run with other settings ({diff}); use "
                                  f"another head_to_head.out_dir, or move that folder away")
        plans[name] = (extra, identity)
    return plans


def _trainable(cfg: DictConfig) -> bool:
    try:
        return bool(getattr(hydra.utils.get_class(cfg.method._target_), "trainable", False))
    except Exception as e:
        raise ConfigError(f"method._target_: cannot import {cfg.method.get('_target_')!r} ({e})") from None


def _checkpoint(name: str, h: DictConfig, out: Path, overrides: list[str]) -> tuple[str | None, str | None]:
    """(checkpoint, None) for a learned editor, training it first when asked; (None, why skipped) otherwise."""
    ckpt = (h.get("checkpoints") or {}).get(name)
    if ckpt:
        return str(ckpt), None
    if not h.get("train_missing"):
        return None, (f"{name}: no trained checkpoint (set head_to_head.checkpoints.{name}=<train run>/editor, "
                      f"or head_to_head.train_missing=true to train it first)")
    train_dir = out / "_train" / name
    if (train_dir / "editor").is_dir() and (train_dir / "train_summary.json").is_file():
        return str(train_dir / "editor"), None  # trained by an earlier invocation
    from kedit_pl.pipeline import run_train

    model_args = [o for o in overrides if o.startswith("model=")]
    tcfg = compose("train", [f"method={name}", *model_args, *(h.get("train") or {}).get(name, []),
                             f"paths.output_dir={train_dir}", "train.resume=true"])
    log.info("training %s first (head_to_head.train_missing=true) into %s", name, train_dir)
    run_train(tcfg)
    return str(train_dir / "editor"), None


def run_edit_script(overrides: list[str], log_file: Path) -> None:
    """`kedit-edit <overrides>` (`python -m kedit_pl.cli.edit`) in a child process (output to `log_file`): how a
    method runs over DDP ranks (`trainer.devices=N trainer.strategy=ddp`), since Lightning starts ranks 1..N-1 by
    re-running the command."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as fh:
        rc = subprocess.call([sys.executable, "-m", "kedit_pl.cli.edit", *overrides], stdout=fh,
                             stderr=subprocess.STDOUT, cwd=REPO_ROOT)
    if rc:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-1:] or ["(empty log)"]
        raise KEditError(f"kedit-edit exited with {rc} ({log_file}): {tail[0]}")


def run_head_to_head(overrides: list[str]) -> dict[str, Any]:
    """Run every configured method (skipping complete ones), then compare them; returns head_to_head.json."""
    from kedit_pl.compare import compare
    from kedit_pl.pipeline import run_edit

    base = compose("edit", [EXPERIMENT, *overrides, "paths.output_dir=/dev/null"])
    h = base.head_to_head
    out = Path(h.out_dir)
    start = time.perf_counter()
    status: dict[str, dict[str, Any]] = {}
    plans = plan_runs(overrides, h, out)
    for name in h.methods:
        run_dir, plan = out / name, plans[name]
        if plan is None:  # a learned editor without a checkpoint
            why = _checkpoint(name, h, out, overrides)[1]
            log.warning("skipping %s", why)
            status[name] = {"status": "skipped", "reason": why}
            continue
        extra, identity = plan
        if is_complete(run_dir, identity):
            log.info("%s: complete in %s, not rerun", name, run_dir)
            status[name] = {"status": "complete (earlier)", "run_dir": str(run_dir)}
            continue
        if any(e.startswith("method.checkpoint=") for e in extra):
            _checkpoint(name, h, out, overrides)  # train_missing: trains it now, unless an earlier invocation did
        resume = (run_dir / "records.jsonl").is_file()
        args = [EXPERIMENT, *overrides, f"method={name}", *extra, f"edit.resume={str(resume).lower()}"]
        cfg = compose("edit", [*args, f"paths.output_dir={run_dir}"])
        log.info("%s: running into %s%s", name, run_dir, " (resuming)" if resume else "")
        t0 = time.perf_counter()
        try:
            if (requested_devices(cfg.trainer) or 1) > 1:  # DDP: Lightning's launcher re-runs a script, not us
                run_edit_script([*args, f"hydra.run.dir={run_dir}"], out / f"{name}.log")
            else:
                run_edit(cfg)
            status[name] = {"status": "ran", "run_dir": str(run_dir), "wall_seconds": time.perf_counter() - t0}
        except KEditError as e:
            log.error("%s failed: %s", name, e)
            status[name] = {"status": "failed", "reason": str(e), "wall_seconds": time.perf_counter() - t0}
    done = [out / n for n in h.methods if plans[n] and is_complete(out / n, plans[n][1])]
    result: dict[str, Any] = {"methods": status, "config": OmegaConf.to_container(h, resolve=True),
                              "wall_seconds_this_invocation": time.perf_counter() - start}
    if done:
        try:  # ranks only runs on the same records (summary.json digests), unless allowed
            rows = compare(done, out, allow_different_records=bool(h.get("allow_different_records", False)))
        except DifferentRecords as e:
            raise ConfigError(str(e)) from None
        walls = [read_json(d / "summary.json").get("timing", {}).get("wall_seconds") for d in done]
        result["wall_seconds_all_runs"] = sum(w for w in walls if w)
        result["time_by_method"] = time_breakdown(done)
        log.info("where the time went (seconds):\n%s", breakdown_table(result["time_by_method"]))
        result["figure"] = str(tradeoff_chart(rows, out / "tradeoffs.png"))
    write_json(out / "head_to_head.json", result)
    return result


def time_breakdown(run_dirs: list[Path]) -> dict[str, dict[str, float]]:
    """Per run: wall seconds, editing seconds, and the evaluation seconds of each phase and part (summary.json's
    `timing`; a resumed run's parts add up its invocations, each as of its last written records)."""
    out = {}
    for d in run_dirs:
        t = read_json(d / "summary.json").get("timing", {})
        row = {"wall": t.get("wall_seconds"), "edit": t.get("seconds_total_edit")}
        for phase, parts in (t.get("seconds_by_phase") or {}).items():
            row |= {f"{phase}/{k}": v for k, v in parts.items()}
        out[d.name] = {k: round(v, 1) for k, v in row.items() if v is not None}
    return out


def breakdown_table(times: dict[str, dict[str, float]]) -> str:
    """`time_breakdown` as a Markdown table, one row per method."""
    cols = list(dict.fromkeys(k for row in times.values() for k in row))
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {m} | " + " | ".join(f"{row[c]:.0f}" if c in row else "" for c in cols) + " |"
              for m, row in times.items()]
    return "\n".join(lines)


#: the trade-offs chart: post-edit rates per method (all percent), then fluency and perplexity beside pre
RATES = (("post_es", "ES"), ("post_ps", "PS"), ("post_ns", "NS"), ("post_alias_es", "alias ES"),
         ("post_dn_ns", "distracting NS"), ("post_port_acc", "portability acc"), ("post_port_rise", "portability rise"))


def tradeoff_chart(rows: list[dict], path: Path) -> Path:
    """ES / PS / NS / aliases / distracting NS / portability per method, and fluency (GE) and perplexity
    before (hatched) and after each method's edits: what separates the families, at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from kedit_pl.eval.report import error_bars
    from kedit_pl.io import atomic_path

    rates = [(k, lab) for k, lab in RATES if any(r.get(k) is not None for r in rows)]
    counts = [r.get("n") for r in rows]
    most = max((c for c in counts if c), default=None)
    # a method that edited fewer records (KN skips facts without specific neurons) shows its count
    labels = [r["method"] if c == most else f"{r['method']} (n={c})" for r, c in zip(rows, counts)]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(max(10, 1.6 * len(rows) + 8), 4.2), gridspec_kw={"width_ratios": [4, 1.3, 1.3]})
    w = 0.8 / max(1, len(rates))
    for i, (k, lab) in enumerate(rates):  # with each rate's 95 % bootstrap interval over records
        vals = [r.get(k) or 0 for r in rows]
        axes[0].bar(x + i * w - 0.4 + w / 2, vals, w, label=lab, capsize=1.5, error_kw={"elinewidth": 0.7},
                    yerr=error_bars(vals, [(r.get("ci") or {}).get(k) for r in rows]))
    axes[0].set_xticks(x, labels)
    axes[0].set_ylim(0, 105)
    axes[0].set_ylabel("post-edit %")
    axes[0].legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, 1.17))
    for ax, key, title, fmt in ((axes[1], "fluency_ge", "fluency GE (×100 bits)", "%.1f"),
                                (axes[2], "ppl", "WikiText ppl", "%.2f")):
        pre, post = ([r.get(f"{g}_{key}") or 0 for r in rows] for g in ("pre", "post"))
        err = {g: error_bars(v, [(r.get("ci") or {}).get(f"{g}_{key}") for r in rows])
               for g, v in (("pre", pre), ("post", post))}  # perplexity is one number per model: no interval
        ax.bar_label(ax.bar(x - 0.2, pre, 0.4, hatch="//", color="lightgray", label="unedited", yerr=err["pre"],
                            capsize=1.5), fmt=fmt, fontsize=6, rotation=90, padding=2)
        ax.bar_label(ax.bar(x + 0.2, post, 0.4, color="tab:blue", label="edited", yerr=err["post"], capsize=1.5),
                     fmt=fmt, fontsize=6, rotation=90, padding=2)
        vals = [v for v in pre + post if v]
        if vals:  # the differences are small: zoom in on the values (the axis does not start at 0)
            lo, hi = min(vals), max(vals)
            ax.set_ylim(lo - 0.1 * (hi - lo + 1e-3) - 0.02 * hi, hi + 0.35 * (hi - lo + 1e-3) + 0.02 * hi)
        ax.set_xticks(x, labels, fontsize=7, rotation=30)
        ax.set_title(title, fontsize=9)
    axes[2].legend(fontsize=7, loc="lower right")
    model = rows[0].get("model", "") if rows else ""
    scope = f"{most} records per method" if len(set(counts)) <= 1 else f"{most} records; fewer where marked"
    fig.suptitle(f"head to head on {model} ({scope})", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """`python -m kedit_pl.head_to_head [overrides]`: run every method, then write the comparison; exits 2 on a
    bad config."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        with interrupts():  # SIGTERM too: Lightning's own handler only notes it, and the runs went on
            result = run_head_to_head(args)
    except Interrupted as e:  # each method's folder keeps its records: the same command resumes
        print(f"error: interrupted ({e}); resume with: {shlex.join(['python', '-m', 'kedit_pl.head_to_head', *args])}",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except KEditError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, st in result["methods"].items():
        print(f"{name}: {st['status']}{' - ' + st['reason'] if st.get('reason') else ''}")
    out = Path(result["config"]["out_dir"])
    if (out / "comparison.md").is_file():
        print((out / "comparison.md").read_text())
    print(f"wrote {out}/comparison.md, comparison.csv, comparison.png, tradeoffs.png, head_to_head.json")


if __name__ == "__main__":
    main()
