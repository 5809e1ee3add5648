"""What edit.py and train.py do, as functions: compose objects from the config and run the Trainer."""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from kedit_pl.data.datamodule import EditDataModule
from kedit_pl.devices import place_model, run_device
from kedit_pl.entry import Interrupted, TrialFailed, in_tolerant_sweep, interrupts, kedit_cause, resume_command
from kedit_pl.distributed import (check_request, collective_error, is_worker, launched_rank, requested_devices,
                                  stop_workers, strategy_for)
from kedit_pl.errors import Collapsed, ConfigError, InvalidRecord, RunFolderBusy
from kedit_pl.eval.callback import EditEvalCallback, new_invocation, read_done_records, wall_seconds
from kedit_pl.eval.groups import CORE, build_groups
from kedit_pl.eval.lifelong import LifelongCallback, plot_curves
from kedit_pl.eval.report import print_table
from kedit_pl.io import read_json, write_json
from kedit_pl.methods.base import EditMethod
from kedit_pl.models.resolvers import register as register_model_resolvers
from kedit_pl.run_folder import RunFolder, edit_batch_size, remove_failed_run, result_files, run_identity
from kedit_pl.runtime import build_loggers, build_trainer, finish_loggers, output_dir  # noqa: F401  (re-exported)
from kedit_pl.sequential_state import SequentialCheckpoint, resume_point
from kedit_pl.validate import validate_cache_folders, validate_edit_config, validate_processes
from kedit_pl.persist import edit_hooks, finish_hooks
from kedit_pl.plan import announce

log = logging.getLogger("kedit_pl")
register_model_resolvers()  # conf/model/hf.yaml resolves in cli() before any model loads
#: train.py outputs a failed run must not delete
KEEP = ("checkpoints", "editor", "train_summary.json")


def method_class(cfg: DictConfig) -> type[EditMethod]:
    """The class named by `method._target_` (imported, not instantiated)."""
    target = cfg.method.get("_target_")
    if not target:
        raise ConfigError(f"method '{cfg.method.get('name')}': config has no _target_ class")
    try:
        return hydra.utils.get_class(target)
    except Exception as e:
        raise ConfigError(f"method._target_: cannot import {target!r} ({e})") from None


def build_method(cfg: DictConfig, loaded=None) -> EditMethod:
    """Load the model and instantiate the method class named by `method._target_` around it."""
    from kedit_pl.models.load import load_model

    cls = method_class(cfg)
    loaded = loaded or load_model(cfg.model)
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg.method, resolve=True).items() if k not in ("_target_",)}
    try:
        method = cls(model=loaded.model, tokenizer=loaded.tokenizer, spec=loaded.spec, **kwargs)
    except TypeError as e:
        raise ConfigError(f"method '{kwargs.get('name')}': bad hyperparameter ({e})") from None
    if cfg.get("trainer") is not None:  # model and editor on the run's device before any work (statistics,
        place_model(method, run_device(cfg.trainer.get("accelerator", "cpu")))  # templates, record checks)
    return method


def drop_uneditable(method: EditMethod, dm: EditDataModule, skip: bool) -> list[dict[str, str]]:
    """Ask the method about every record before the first edit. Records it cannot edit (a subject that
    tokenizes differently in context, ...) are dropped and listed, or, with `edit.skip_invalid=false`, fail
    the run before anything is edited."""
    problems = [{"case_id": str(r.case_id), "reason": p} for r in dm.requests if (p := method.request_problem(r))]
    if problems and not skip:
        raise InvalidRecord(f"{len(problems)} record(s) cannot be edited by {type(method).__name__}; first: "
                            f"{problems[0]['reason']} (edit.skip_invalid=true skips them)")
    for p in problems:
        log.warning("skipping: %s", p["reason"])
    if problems:
        bad = {p["case_id"] for p in problems}
        dm.requests = [r for r in dm.requests if str(r.case_id) not in bad]
        if not dm.requests:
            raise InvalidRecord("edit.skip_invalid: every selected record was skipped; nothing to edit")
    return problems


def run_edit(cfg: DictConfig) -> dict[str, Any]:
    """Apply and evaluate edits per `edit.mode`; returns the summary written to summary.json (rank 0; {} on the
    other ranks of a DDP run)."""
    validate_edit_config(cfg)  # every bad value is one line before anything heavy (or any file) is made
    validate_processes(cfg, requested_devices(cfg.trainer) or 1)
    if not is_worker() and announce(cfg, "edit") is not None and cfg.edit.get("dry_run", False):
        return {}  # edit.dry_run: the memory plan only, nothing loaded
    n_procs = check_request(cfg)
    mode = cfg.edit.mode
    batch_size = edit_batch_size(cfg)
    if is_worker():  # a DDP rank > 0 in rank 0's folder: rank 0 owns it (lock, identity) and writes the results
        return _run_edit(cfg, mode, batch_size, n_procs)
    new_invocation()
    with RunFolder(output_dir(cfg), run_identity(cfg, batch_size), resume=cfg.edit.resume,
                   overwrite=bool(cfg.edit.get("overwrite", False))):
        return _run_edit(cfg, mode, batch_size, n_procs)


def _run_edit(cfg: DictConfig, mode: str, batch_size: int, n_procs: int = 1) -> dict[str, Any]:
    started = time.perf_counter()  # the wall time covers loading, locating (KN) and pre-scoring too
    out = output_dir(cfg)
    resume_sequential = cfg.edit.resume and mode == "sequential"
    state = resume_point(out, method_class(cfg)) if resume_sequential else None  # records.jsonl cut to it
    done_ids = {d["case_id"] for d in read_done_records(out)} if cfg.edit.resume else set()
    dm = EditDataModule(cfg.dataset, edit_batch_size=batch_size, exclude_ids=done_ids, seed=cfg.seed)
    dm.prepare_requests()  # fail on bad data before loading anything heavy
    ev = OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else {}
    groups = build_groups(list(ev.get("metrics") or [CORE]), ev)  # and on a bad eval.metrics
    samples = ev.get("samples") or {}
    if done_ids and not dm.requests:
        return finished_summary(out, len(done_ids))
    L.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg)
    loaded = time.perf_counter()
    skipped = dm.invalid + drop_uneditable(method, dm, skip=bool(cfg.edit.get("skip_invalid", True)))
    # where the time before the first edit went: reading the records and loading, then the record checks (KN
    # locates its knowledge neurons there, so that is most of a KN run)
    setup = {"load": loaded - started, "record_checks": time.perf_counter() - loaded}
    share_batches(method, dm, n_procs)
    run_info = {"method": cfg.method.name, "model": cfg.model.name, "dataset": cfg.dataset.name,
                "n_records": len(dm.requests) + len(done_ids), "batch_size": batch_size,
                "config": OmegaConf.to_container(cfg.method, resolve=True), "skipped": skipped, **dm.selection}
    hooks = edit_hooks(cfg, method, dm.requests, out)  # edit.save=patch|model, edit.show=k
    pre_cache = Path(cfg.paths.cache_dir) / "pre_scores" if cfg.get("eval", {}).get("cache_pre", True) else None
    callback = EditEvalCallback(out, mode=mode, eval_batch_size=cfg.edit.eval_batch_size,
                                resume=cfg.edit.resume, run_info=run_info, groups=groups,
                                samples=int(samples.get("k") or 0), sample_tokens=int(samples.get("max_new_tokens", 40)),
                                pre_cache=pre_cache, on_edit=hooks, started=started,
                                states_per_forward=cfg.get("eval", {}).get("states_per_forward", 1),
                                states_max_mb=cfg.get("eval", {}).get("states_max_mb", 2048),
                                prefix_cache_mb=cfg.get("eval", {}).get("prefix_cache_mb", 1024))
    callback.clock["setup"] = setup
    lifelong = lifelong_callback(cfg, out) if mode == "sequential" else None
    checkpoint = SequentialCheckpoint(out, state, lifelong) if mode == "sequential" else None
    if state:
        checkpoint.resume(method, callback, dm.done_requests)
    loggers = build_loggers(cfg)
    callbacks = [callback, lifelong, checkpoint if method.sequential_resumable else None]  # checkpoint: last
    trainer = build_trainer(cfg, [c for c in callbacks if c is not None], loggers)
    try:
        trainer.test(method, datamodule=dm, verbose=False)
        finish_hooks(cfg, method, hooks, out, dm.done_requests + dm.requests)  # edit.save=model (sequential: all)
    except Collapsed:
        # summarize the edits made up to the collapse, then fail the run with the reason
        edited = {str(r.case_id) for r in lifelong.edited}
        dm.requests = [r for r in dm.requests if str(r.case_id) in edited]
        callback.on_test_end(trainer, method)
        raise
    except BaseException as e:
        stop_workers(trainer)  # DDP: no rank keeps computing for a failed run
        raise collective_error(e) or e
    finally:
        if callback.summary:
            wall = wall_seconds(callback.done, callback.invocation, started)  # a resume adds the earlier runs'
            if wall is None:  # lines from before `elapsed` was recorded: a sequential checkpoint still knows
                wall = (checkpoint.earlier_seconds if checkpoint else 0.0) + time.perf_counter() - started
            callback.summary["timing"]["wall_seconds"] = wall
            if lifelong:
                callback.summary["lifelong"] = lifelong.summary()
                try:
                    plot_curves({cfg.method.name: lifelong.rows}, out / "lifelong.png", lifelong.collapse_limit)
                except Exception as e:  # a plot must never cost the results
                    log.warning("lifelong plot failed: %s", e)
            write_json(out / "summary.json", callback.summary)  # again, with the wall time and lifelong rows
            finish_loggers(loggers)
    log.info("results in %s", out)
    return callback.summary


def share_batches(method: EditMethod, dm: EditDataModule, n_procs: int) -> None:
    """DDP: a method that can share a batch among ranks gets every batch on every rank (batches of more than one
    record); otherwise whole batches go round-robin to the ranks, and there must be one per rank at least."""
    if n_procs == 1:
        return
    shared = method.can_share_batches and dm.edit_batch_size > 1
    method.shared_batches = dm.shared_batches = shared
    n_batches = len(dm.edit_batches())
    if not shared and n_batches < n_procs:
        raise ConfigError(f"trainer.devices: {n_procs} processes but only {n_batches} batch(es) of edits to spread; "
                          f"use trainer.devices<={n_batches}")
    log.info("DDP over %d processes: %s", n_procs, "every rank shares each batch" if shared else
             f"{n_batches} batches spread round-robin")


def finished_summary(out: Path, n_done: int) -> dict[str, Any]:
    """Resuming a finished run: nothing to edit; its summary as written (exit 0)."""
    path = out / "summary.json"
    if not path.is_file():
        raise ConfigError(f"edit.resume: all {n_done} records are in {out / 'records.jsonl'} but the run wrote no "
                          f"summary.json; rerun it with edit.overwrite=true")
    summary = read_json(path)
    log.info("edit.resume: nothing to do, all %d records of this run are done; results in %s", n_done, out)
    print_table(summary)
    return summary


def lifelong_callback(cfg: DictConfig, out: Path) -> LifelongCallback | None:
    """The lifelong protocol (eval/lifelong.py) of a sequential run, unless `edit.lifelong.every=0`."""
    lcfg = cfg.edit.get("lifelong")
    if lcfg is None or not lcfg.get("every"):
        return None
    return LifelongCallback(out, OmegaConf.to_container(lcfg, resolve=True), cfg.edit.eval_batch_size)


def metric_value(summary: dict[str, Any], path: str) -> float | None:
    """'post/score' -> `summary['post']['score']` (what a sweep maximizes); None, with a warning, if absent (and
    quietly for a DDP rank > 0, which writes no summary)."""
    if is_worker() or not summary:  # a DDP rank > 0, or a dry run
        return None
    group, _, name = path.partition("/")
    value = summary.get(group, {}).get(name)
    if value is None:
        log.warning("optimized_metric %r is not in this run's summary (zsRE has no NS, hence no score); "
                    "set optimized_metric=post/es for sweeps on it", path)
    return None if value is None else float(value)


def quiet_libraries() -> None:
    """Silence library chatter a user cannot act on: deprecations inside libraries, Lightning's tips and
    hardware banner (GPU/TPU available), and its note on our own `transfer_batch_to_device`."""
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*overridden `transfer_batch_to_device`.*")
    # DDP: every rank runs the same validation batches (only the edit-validation callback splits its work, and it
    # gathers), so each rank logs the same value and there is nothing to sync
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed setting.*")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cli(fn: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run an entry point (kedit_pl/entry.py): user errors become one line on stderr (exit 2; in a sweep the trial
    fails and the study goes on), an interruption says how to resume (exit 128 + signal), and a run that stops
    without results leaves no files."""
    out = output_dir(cfg)
    quiet_libraries()
    before = {p.name for p in out.iterdir()} if out.is_dir() else set()  # (Hydra's .hydra/ and log included)
    try:
        with interrupts():
            validate_cache_folders(cfg)  # every entry point (edit.py also checks it in run_edit)
            return fn(cfg)
    except Interrupted as e:
        command = resume_command(cfg, out)
        _clean_up(out, before, owned=not is_worker())
        print(f"error: interrupted ({e}); {f'resume with: {command}' if command else 'start it again'}",
              file=sys.stderr)
        sys.exit(128 + e.signum)
    except Exception as e:
        user_error = kedit_cause(e)
        if user_error is None:
            raise
        worker = is_worker()
        print(f"error: {f'[rank {launched_rank()}] ' if worker else ''}{user_error}", file=sys.stderr)
        if in_tolerant_sweep():  # the sweeper records the failed trial and goes on; its folder keeps the reason
            log.error("trial failed: %s", user_error)
            raise TrialFailed(str(user_error)) from None
        _clean_up(out, before, owned=not (worker or isinstance(user_error, RunFolderBusy)))
        sys.exit(2)


def _clean_up(out: Path, before: set[str], owned: bool = True) -> None:
    """Remove what a stopped run made when it wrote no results a resume continues and the folder is ours
    (`owned=False`: another live process's folder, or a DDP rank's); a user's own files in the folder stay."""
    if owned and out.exists() and not result_files(out) and not any((out / f).exists() for f in KEEP):
        remove_failed_run(out, before)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """Train a learned editor (MEND, KE, SERAC) with checkpoints, early stopping and resume. Under DDP
    (`trainer.devices=N trainer.strategy=ddp`) `train.batch_size` is per process; checkpoints, the export and
    train_summary.json come from rank 0 (the other ranks return {}). With a `teach` node (experiment=ftrace_teach),
    fine-tune the model on a fact-tracing corpus instead (one process)."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    if cfg.get("teach") is not None:
        from kedit_pl.locate.influence.teach import run_teach

        return run_teach(cfg)

    from kedit_pl.eval.val_callback import EditValidationCallback

    check_request(cfg)
    if not is_worker() and announce(cfg, "train") is not None and cfg.train.get("dry_run", False):
        return {}  # train.dry_run: the memory plan only
    out = output_dir(cfg)
    t = cfg.train
    dm = EditDataModule(cfg.dataset, train_batch_size=t.batch_size, seed=cfg.seed)
    dm.prepare_training(out)  # skipped training records: one warning line, listed in out/skipped_train_records.json
    L.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg)
    if not method.trainable:
        raise ConfigError(f"method '{cfg.method.name}' has nothing to train; use edit.py (train.py is for learned editors: MEND, KE, SERAC)")
    ckpt_dir = out / "checkpoints"
    callbacks = [
        EditValidationCallback(n_records=t.val_edits, eval_batch_size=cfg.get("eval_batch_size", 64),
                               edits_per_apply=int(t.get("val_edits_per_apply", 1))),
        # the best editor is saved right after each validation, with that validation's score (a step-triggered
        # save would pair the weights with the previous validation's score); last.ckpt (resume) every n steps
        ModelCheckpoint(dirpath=ckpt_dir, filename="best-{step}", monitor=t.monitor, mode=t.monitor_mode, save_top_k=1),
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=t.get("checkpoint_every_n_steps")),
        EarlyStopping(monitor=t.monitor, mode=t.monitor_mode, patience=t.patience),
    ]
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, callbacks, loggers)
    last = ckpt_dir / "last.ckpt"
    resume_from = str(last) if t.resume and last.exists() else None
    if t.resume and resume_from is None:
        log.warning("train.resume: no %s yet, starting from scratch", last)
    start = time.perf_counter()
    try:
        trainer.fit(method, datamodule=dm, ckpt_path=resume_from)
    except BaseException as e:
        stop_workers(trainer)
        raise collective_error(e) or e
    if not trainer.is_global_zero:
        return {}
    best = callbacks[1].best_model_path
    result = {"best_checkpoint": best, "best_score": _float(callbacks[1].best_model_score),
              "global_step": trainer.global_step, "train_seconds": time.perf_counter() - start,
              "processes": trainer.world_size, "seed": cfg.seed}
    if best and Path(best).is_file():  # export the best validated editor, not the last step's
        method.load_editor(best)
        result["exported_from"] = best
    if hasattr(method, "export"):
        result["export"] = str(method.export(out / "editor"))
    finish_loggers(loggers)
    from kedit_pl.io import write_json

    write_json(out / "train_summary.json", result)
    log.info("training done: %s", result)
    return result


def _float(x) -> float | None:
    return None if x is None else float(x)
