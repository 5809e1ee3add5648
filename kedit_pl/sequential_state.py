"""Resuming an interrupted sequential run (`edit.mode=sequential edit.resume=true`).

A sequential run's edits accumulate in the model, so unlike single/batch mode its remaining records cannot
start from the unedited model. After every batch `SequentialCheckpoint` therefore writes
`sequential_state.safetensors` into the run folder (atomically, with digests of its tensors and of its JSON part):
- the current value of every parameter any batch so far has changed (only those), with the digest of each
  one's unedited value and the fingerprint of the whole unedited model they apply to;
- the method's own state carried across batches (`EditMethod.sequential_state`: AlphaEdit's K_pK_pᵀ);
- the records edited so far (case_ids, in order), the batch count, the RNG states, and the lifelong protocol's
  state (rows, sample, start perplexity; its ‖ΔW‖ reference is the unedited model, loaded again).
A resume (`resume_point`) reads it before any model loads (a damaged file is one line naming it) and keeps
exactly the checkpoint's lines of records.jsonl (a batch cut off after its lines were written is redone; a run
cut off in its first batch has no checkpoint yet and starts again from the unedited model). The
base model is loaded and prepared as usual (statistics, templates, pre-edit scores on the unedited weights);
then the checkpoint's weights are written in, once the unedited ones are checked, and the run goes on with the
next batch, bit for bit as if it had never stopped.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.digests import DIGEST_VERSION, file_version, json_digest, model_fingerprint, tensor_digest
from kedit_pl.errors import Collapsed, ConfigError, DamagedFile
from kedit_pl.eval.callback import RECORDS_FILE, EditEvalCallback, read_done_records
from kedit_pl.eval.lifelong import LifelongCallback
from kedit_pl.io import DIGEST_KEY, digest_metadata, read_json, read_tensors, save_tensors, write_text
from kedit_pl.run_folder import SEQUENTIAL_STATE
from kedit_pl.weights import EditMethodProtocol, write_back

log = logging.getLogger(__name__)

STATE_KEY, STATE_DIGEST = "kedit_sequential_state", "kedit_sequential_state_digest"
#: tensor name prefixes in the file
WEIGHT, METHOD, RNG = "weight/", "method/", "rng/"
#: the fields stored as JSON in the file's metadata (the others are its tensors)
JSON_FIELDS = ("edited", "batches", "wall_seconds", "fingerprint", "base", "lifelong", "python_rng")


@dataclass
class SequentialState:
    """What continuing a sequential run needs, as of the end of its last finished batch."""

    edited: list[str] = field(default_factory=list)  # case_ids edited so far, in order
    batches: int = 0
    wall_seconds: float = 0.0  # of the edit loop up to this checkpoint, over every run that made it
    fingerprint: str = ""  # model_fingerprint of the unedited model
    base: dict[str, str] = field(default_factory=dict)  # parameter -> tensor_digest of its unedited value
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> its current value
    method: dict[str, torch.Tensor] = field(default_factory=dict)  # EditMethod.sequential_state()
    lifelong: dict[str, Any] | None = None  # LifelongCallback.state()
    rng: dict[str, torch.Tensor] = field(default_factory=dict)
    python_rng: list | None = None

    def save(self, path: str | Path) -> None:
        """Write the state's tensors and fields to `path` with digests of both, atomically."""
        tensors = {prefix + k: v for prefix, part in self._tensors().items() for k, v in part.items()}
        info = {k: getattr(self, k) for k in JSON_FIELDS}
        save_tensors(path, tensors,
                     digest_metadata(tensors) | {STATE_KEY: json.dumps(info), STATE_DIGEST: json_digest(info)})

    def _tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {WEIGHT: self.weights, METHOD: self.method, RNG: self.rng}

    @classmethod
    def read(cls, path: str | Path) -> "SequentialState":
        """The checkpoint at `path`; `DamagedFile` (one line naming it) if it is unreadable or fails a digest."""
        tensors, meta = read_tensors(path, "edit.resume")
        if DIGEST_KEY in meta and file_version(meta) != DIGEST_VERSION:
            raise ConfigError(f"edit.resume: {path} was written with digest version {file_version(meta)}, this kedit_pl "
                              f"checks weights with version {DIGEST_VERSION} (kedit_pl/digests.py) and cannot verify "
                              f"it; rerun with edit.overwrite=true")
        try:
            info = json.loads(meta[STATE_KEY])
            intact = meta[DIGEST_KEY] == tensor_digest(tensors) and meta[STATE_DIGEST] == json_digest(info)
        except (KeyError, ValueError):
            intact = False
        if not intact:
            raise DamagedFile(f"edit.resume: {path} is damaged (its content does not match the digest stored in "
                              f"it); the run cannot continue: rerun it with edit.overwrite=true")
        state = cls(**{k: info[k] for k in JSON_FIELDS})
        for prefix, part in state._tensors().items():
            part.update({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        return state


def resume_point(out: Path, method: type[EditMethod]) -> SequentialState | None:
    """The checkpoint of the interrupted sequential run of `method` in `out`, with records.jsonl cut back to the
    records it holds; None when no batch finished: records of a first batch cut off before its checkpoint are
    removed, and the run starts again from the unedited model (loaded from its source: edits never reach it).
    A run that collapsed stays as it ended: `Collapsed` again, nothing done."""
    summary = out / "summary.json"
    if summary.is_file():
        collapsed = (read_json(summary).get("lifelong") or {}).get("collapsed")
        if collapsed:
            raise Collapsed(f"edit.resume: the run in {out} ended with a {collapsed}")
    records, path = read_done_records(out), out / SEQUENTIAL_STATE
    if not path.is_file():
        return _before_first_checkpoint(out, method, records)
    state = SequentialState.read(path)
    by_id = {str(d["case_id"]): d for d in records}
    missing = [i for i in state.edited if i not in by_id]
    if missing:
        raise DamagedFile(f"edit.resume: {out / RECORDS_FILE} lacks {len(missing)} record(s) that {path} says were "
                          f"edited (first: {missing[0]!r}); rerun it with edit.overwrite=true")
    if len(by_id) > len(state.edited):
        log.warning("edit.resume: %d record(s) of %s come from a batch after the last checkpoint; they are redone",
                    len(by_id) - len(state.edited), RECORDS_FILE)
    write_text(out / RECORDS_FILE, "".join(json.dumps(by_id[i]) + "\n" for i in state.edited))
    log.info("edit.resume: continuing the sequential run in %s after %d batch(es), %d edit(s)", out, state.batches,
             len(state.edited))
    return state


def _before_first_checkpoint(out: Path, method: type[EditMethod], records: list[dict]) -> None:
    """`out` has no checkpoint: fine if no record or only the first batch's are there (that batch is redone)."""
    if not records:
        return None
    if not method.sequential_resumable:
        raise ConfigError(f"edit.resume: {method.__name__} cannot continue a sequential run (its state between "
                          f"batches is not checkpointed); rerun it with edit.overwrite=true")
    batches = sorted({d.get("batch") for d in records}, key=str)
    if batches != [0]:
        raise DamagedFile(f"edit.resume: {out / RECORDS_FILE} holds records of {len(batches)} sequential batches "
                          f"but {out / SEQUENTIAL_STATE}, written after each batch, is missing; the edits cannot be "
                          f"continued: rerun it with edit.overwrite=true")
    log.warning("edit.resume: the run in %s was cut off in its first batch, before its first checkpoint; its %d "
                "record(s) are redone from the unedited model", out, len(records))
    (out / RECORDS_FILE).unlink()
    return None


class SequentialCheckpoint(L.Callback):
    """Writes the `SequentialState` after every batch (last among the callbacks, so it holds that batch's records
    and lifelong row); on resume, writes the saved state back before the first new batch."""

    def __init__(self, out: str | Path, state: SequentialState | None = None,
                 lifelong: LifelongCallback | None = None) -> None:
        self.path, self.resumed = Path(out) / SEQUENTIAL_STATE, state is not None
        self.state, self.lifelong = state or SequentialState(), lifelong
        self.earlier_seconds, self._start = self.state.wall_seconds, time.perf_counter()

    def resume(self, method: EditMethodProtocol, evaluation: EditEvalCallback, done: list[EditRequest]) -> None:
        """Hand the earlier records (`done`, the datamodule's) to the callbacks that go on counting them."""
        if not method.sequential_resumable:
            raise ConfigError(f"edit.resume: {type(method).__name__} cannot continue a sequential run (its state "
                              f"is not checkpointed); rerun it with edit.overwrite=true")
        by_id = {str(r.case_id): r for r in done}
        edited = [by_id[i] for i in self.state.edited]
        evaluation.resume_sequential(edited, self.state.batches)
        if self.lifelong is not None:
            if self.state.lifelong is None:
                raise ConfigError(f"edit.resume: {self.path} was written without the lifelong protocol; resume "
                                  f"with edit.lifelong.every=0 as it ran")
            self.lifelong.resume(self.state.lifelong, edited, self.state.batches)

    def on_test_start(self, trainer: L.Trainer, pl_module: EditMethodProtocol) -> None:
        # the method's per-model caches (statistics, templates: prepare_data) and the pre-edit scores were made on
        # the unedited model, as in an uninterrupted run; now the edits so far go in
        fingerprint = model_fingerprint(pl_module.model)
        if not self.resumed:
            self.state.fingerprint = fingerprint
            return
        s = self.state
        params = dict(pl_module.model.named_parameters())
        changed = [n for n, d in s.base.items() if n not in params or tensor_digest({n: params[n]}) != d]
        if fingerprint != s.fingerprint or changed:
            raise ConfigError(f"edit.resume: the model loaded now is not the unedited model {self.path} was edited "
                              f"from (weights digest {fingerprint}, the checkpoint's {s.fingerprint}"
                              f"{f'; {changed[0]} differs' if changed else ''}); resume with the same model weights")
        write_back(pl_module.model, s.weights)
        pl_module.load_sequential_state(s.method)
        torch.set_rng_state(s.rng["torch"])
        if torch.cuda.is_available() and "cuda" in s.rng:
            torch.cuda.set_rng_state(s.rng["cuda"])
        random.setstate((s.python_rng[0], tuple(s.python_rng[1]), s.python_rng[2]))

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: EditMethodProtocol, outputs,
                          batch: list[EditRequest], batch_idx: int, dataloader_idx: int = 0) -> None:
        s = self.state
        for n, v in getattr(pl_module.last_handle, "originals", {}).items():
            if n not in s.base:  # its value before its first edit: the unedited one
                s.base[n] = tensor_digest({n: v})
        params = dict(pl_module.model.named_parameters())
        s.weights = {n: params[n].detach() for n in s.base}
        s.method = pl_module.sequential_state()
        s.edited += [str(r.case_id) for r in batch]
        s.batches += 1
        s.wall_seconds = self.earlier_seconds + time.perf_counter() - self._start
        s.lifelong = self.lifelong.state() if self.lifelong is not None else None
        s.rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            s.rng["cuda"] = torch.cuda.get_rng_state()
        s.python_rng = list(random.getstate())
        s.save(self.path)
