"""A run folder has one owner and one identity, so its results always come from the run it names.

- Ownership: a writer holds an exclusive `fcntl.flock` on `<folder>/.kedit.lock` for the whole run; a second
  process fails fast (the kernel drops the lock when its holder dies, so a crashed run never blocks a resume).
- Identity: `run.json` records what produced the results (method, model, dataset selection, mode, batch size,
  seed, the method's resolved config). A resume must match it (it may only raise dataset.limit); the first
  difference is named.
- A fresh run refuses a folder that already holds results, unless `edit.overwrite=true`, which moves the earlier
  run, everything in the folder but this run's lock, `.hydra/` and log, to the sibling folder
  `<name>.replaced-<UTC time>` (said in the log): nothing is deleted, and nothing of the old run stays beside the new.
- A resume first cuts a torn last line off records.jsonl (a run killed while writing it), so it appends cleanly.
- A run that fails before any result removes what it made (`remove_failed_run`), never the folder's other files.
See docs/run_folders.md.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kedit_pl.errors import ConfigError, RunFolderBusy
from kedit_pl.io import mend_torn_tail, read_json, write_json

log = logging.getLogger(__name__)
#: before Hydra makes this process's run folder (edit.py imports this module first)
PROCESS_STARTED = time.time()

LOCK_FILE = ".kedit.lock"
IDENTITY_FILE = "run.json"
#: Hydra rewrites <folder>/.hydra/ before any job code runs; the owner's copy is kept here and put back
#: when a refused run (busy, used, mismatched) has overwritten it
HYDRA_DIR, HYDRA_COPY = ".hydra", ".hydra.owner"
#: a sequential run's checkpoint after its last batch (kedit_pl/sequential_state.py)
SEQUENTIAL_STATE = "sequential_state.safetensors"
#: the evaluation's seconds per phase of each invocation, as of its last written records (eval/callback.py)
TIMING_FILE = "timing.jsonl"
#: files holding a run's results (removed by edit.overwrite=true); run.json alone is no result
RESULT_FILES = ("records.jsonl", "summary.json", "metrics.png", "retention.png", SEQUENTIAL_STATE, TIMING_FILE)
#: under DDP each rank appends its records here while it runs; rank 0 merges them into records.jsonl at the end
#: (an interrupted run's parts are results too: a resume reads them)
RANK_RECORDS = "records.rank{rank}.jsonl"


def rank_record_files(path: str | Path) -> list[Path]:
    """The per-rank record files of a DDP run in `path` that rank 0 has not merged yet."""
    return sorted(Path(path).glob(RANK_RECORDS.format(rank="*")))


def result_files(path: str | Path) -> list[str]:
    """Names of the result files present in `path`."""
    path = Path(path)
    return [f for f in RESULT_FILES if (path / f).exists()] + [p.name for p in rank_record_files(path)]
#: dataset fields that decide which records a run edits
SELECTION = ("name", "path", "format", "limit", "range", "ids", "on_invalid")


def run_identity(cfg: DictConfig, batch_size: int) -> dict[str, Any]:
    """What a run's results depend on, in the order differences are reported."""
    data = OmegaConf.to_container(cfg.dataset, resolve=True)
    selection = {k: data.get(k) for k in SELECTION}
    if (data.get("split") or "all") != "all":  # folders from before splits existed stay resumable
        selection |= {"split": data.get("split"), "split_rule": data.get("split_rule")}
    identity = {"method": cfg.method.name, "model": cfg.model.name, "dataset": selection, "mode": cfg.edit.mode, "batch_size": batch_size,
                "seed": cfg.seed, "method_config": OmegaConf.to_container(cfg.method, resolve=True),
                "eval": OmegaConf.to_container(cfg.eval, resolve=True) if cfg.get("eval") else None}
    lifelong = cfg.edit.get("lifelong")
    if cfg.edit.mode == "sequential" and lifelong is not None:  # its lifelong rows go on in a resumed run
        identity["lifelong"] = OmegaConf.to_container(lifelong, resolve=True)
    return identity


def first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """'dataset.limit: 5 in the folder, 8 now' for the first differing leaf, None if equal."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in list(old) + [k for k in new if k not in old]:
            diff = first_difference(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{path}.{k}" if path else k)
            if diff:
                return diff
        return None
    return None if old == new else f"{path}: {old!r} in the folder, {new!r} now"


def _extendable(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old` with its dataset.limit taken from `new` if `new` only raises it: the records done are then a prefix
    of the new selection (same order), so a resume may extend a run, never shrink or reshuffle it."""
    lo, hi = (old.get("dataset") or {}).get("limit"), (new.get("dataset") or {}).get("limit")
    if isinstance(lo, int) and (hi is None or (isinstance(hi, int) and hi >= lo)):
        return old | {"dataset": old["dataset"] | {"limit": hi}}
    return old


def folder_identity(path: str | Path) -> dict[str, Any]:
    """The run.json of the run whose results are in `path` (one-line ConfigError if absent or damaged)."""
    ident = Path(path) / IDENTITY_FILE
    if not ident.is_file():
        raise ConfigError(f"edit.resume: {path} has results but no {IDENTITY_FILE} saying what made them "
                          f"(an older run?); rerun it with edit.overwrite=true")
    try:
        return read_json(ident)
    except ValueError as e:
        raise ConfigError(f"edit.resume: {ident} is damaged ({e}); rerun with edit.overwrite=true") from None


def identity_difference(path: str | Path, identity: dict[str, Any]) -> str | None:
    """Why the results in `path` cannot be continued by a run of `identity` (None: they can; a raised
    dataset.limit extends them)."""
    return first_difference(_extendable(folder_identity(path), identity), identity)


def is_finished_run_of(path: str | Path, identity: dict[str, Any]) -> bool:
    """`path` holds the finished run (summary.json) of exactly `identity`: nothing is left to do."""
    path = Path(path)
    return ((path / "summary.json").is_file() and (path / IDENTITY_FILE).is_file()
            and first_difference(folder_identity(path), identity) is None)


def edit_batch_size(cfg: DictConfig) -> int:
    """Records per edit: 1 in single mode, else edit.batch_size."""
    return 1 if cfg.edit.mode == "single" else int(cfg.edit.batch_size)


def remove_failed_run(path: str | Path, before: set[str]) -> None:
    """A run that failed before writing any result leaves nothing behind, and touches nothing it did not make:
    the entries that appeared in `path` after `before` (its listing when the run started) go, and Hydra's
    .hydra/ and log when this process made them; the folder itself goes only if that empties it."""
    path = Path(path)
    if not path.is_dir():
        return
    hydra = path / HYDRA_DIR
    hydra_ours = (hydra.is_dir() and HYDRA_COPY not in before  # (an earlier owner's run: its .hydra/ is restored)
                  and hydra.stat().st_mtime >= PROCESS_STARTED - 1)
    hydra_files = {HYDRA_DIR, *(f.name for f in _own_log_files(path))} if hydra_ours else set()
    logging.shutdown()  # (closes the log file before it goes)
    for entry in path.iterdir():
        if entry.name not in before or entry.name in hydra_files:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    if not any(path.iterdir()):
        path.rmdir()


def _own_log_files(folder: Path) -> list[Path]:
    """Files in `folder` that this process's logging handlers write to (Hydra's <job>.log)."""
    handlers = [h for lg in [logging.getLogger()] + [logging.getLogger(n) for n in logging.root.manager.loggerDict]
                for h in getattr(lg, "handlers", [])]
    files = {Path(h.baseFilename) for h in handlers if isinstance(h, logging.FileHandler)}
    return [f for f in files if f.parent.resolve() == folder.resolve() and f.is_file()]


class RunFolder:
    """Context manager owning `path` for one edit run; see the module docstring for the rules."""

    def __init__(self, path: str | Path, identity: dict[str, Any], resume: bool = False,
                 overwrite: bool = False) -> None:
        self.path, self.identity, self.resume, self.overwrite = Path(path), identity, resume, overwrite
        self._fd: int | None = None

    def results(self) -> list[str]:
        """Result files already in the folder (`records.jsonl`, `summary.json`, ...)."""
        return result_files(self.path)

    def __enter__(self) -> "RunFolder":
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            self._restore_hydra()
            raise RunFolderBusy(f"hydra.run.dir: {self.path} is being written by another running process "
                                f"(pid {holder}); wait for it, or pick another hydra.run.dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)  # informational only; the flock is the guard
        self._fd = fd
        try:
            self._claim()
        except BaseException:
            self._restore_hydra()
            self.__exit__(None, None, None)
            raise
        self._keep_hydra()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _keep_hydra(self) -> None:
        src, dst = self.path / HYDRA_DIR, self.path / HYDRA_COPY
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)

    def _restore_hydra(self) -> None:
        """Put back the owner's .hydra/ (config, overrides) that this refused run's Hydra overwrote."""
        src, dst = self.path / HYDRA_COPY, self.path / HYDRA_DIR
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst)

    def _claim(self) -> None:
        used = self.results()
        if self.overwrite and (used or (self.path / IDENTITY_FILE).exists()):
            self._move_aside()
        elif used and not self.resume:
            raise ConfigError(f"hydra.run.dir: {self.path} already holds results ({', '.join(used)}); continue "
                              f"it with edit.resume=true, replace it with edit.overwrite=true, or pick another folder")
        elif used:
            self._check_resume()
            for f in [self.path / RESULT_FILES[0], *rank_record_files(self.path)]:
                mend_torn_tail(f, "edit.resume")
        write_json(self.path / IDENTITY_FILE, self.identity)

    def _move_aside(self) -> None:
        """edit.overwrite=true: the earlier run (every entry but this run's lock, .hydra/ and log) moves to a new
        sibling folder; the log names it. The earlier run's own .hydra/ (kept as .hydra.owner) goes with it."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}")
        for i in range(2, 1000):
            if not aside.exists():
                break
            aside = self.path.with_name(f"{self.path.name}.replaced-{stamp}-{i}")
        aside.mkdir()
        logs = _own_log_files(self.path)
        moved = []
        for entry in sorted(self.path.iterdir()):
            if entry.name in (LOCK_FILE, HYDRA_DIR, *(f.name for f in logs)):
                continue
            entry.rename(aside / (HYDRA_DIR if entry.name == HYDRA_COPY else entry.name))
            moved.append(entry.name)
        for f in logs:  # the log file Hydra opened for this run holds the earlier run's lines first
            shutil.copy2(f, aside / f.name)
            os.truncate(f, 0)
            moved.append(f.name)
        log.warning("edit.overwrite=true: moved the earlier run in %s (%d entries: %s) to %s; nothing was deleted",
                    self.path, len(moved), ", ".join(moved[:8]) + (", ..." if len(moved) > 8 else ""), aside)

    def _check_resume(self) -> None:
        diff = identity_difference(self.path, self.identity)
        if diff:
            raise ConfigError(f"edit.resume: this run differs from the one in {self.path}: {diff}; resume with the "
                              f"same settings, or use another hydra.run.dir (or edit.overwrite=true)")
