"""EditEvalCallback: measures every edit before and after, logs, writes results, restores per mode."""
from __future__ import annotations

import json
import logging
import resource
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.report import print_table, write_summary_files
from kedit_pl.eval.scoring import score_requests
from kedit_pl.io import write_text

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
RECORDS_FILE = "records.jsonl"


def read_done_records(output_dir: str | Path) -> list[dict]:
    """Per-record results already written by an interrupted run (a torn last line is ignored)."""
    path = Path(output_dir) / RECORDS_FILE
    done = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                done.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring a torn line in %s", path)
    return done


class EditEvalCallback(L.Callback):
    """Pre-metrics on the unedited model, post-metrics right after each batch of edits.

    mode=single/batch: restore after each batch. mode=sequential: keep edits, and re-evaluate every
    edited record at the end (`final/...`, i.e. retention after all edits).
    """

    def __init__(self, output_dir: str | Path, mode: str = "single", eval_batch_size: int = 64,
                 resume: bool = False, run_info: dict[str, Any] | None = None,
                 on_edit: list[Callable] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"edit.mode: must be one of {MODES}, got {mode!r}")
        self.out = Path(output_dir)
        self.mode = mode
        self.eval_batch_size = eval_batch_size
        self.run_info = run_info or {}
        self.on_edit = list(on_edit or [])  # fn(method, handle, batch, batch_idx) while the edit is in place
        self.done = read_done_records(self.out) if resume else []
        self.pre: dict[str, dict] = {}
        self.summary: dict[str, Any] = {}

    # --- helpers -------------------------------------------------------------------------------------
    def _score(self, pl_module, requests: list[EditRequest]) -> list[dict]:
        return score_requests(pl_module.logits_fn(), pl_module.tok, requests, self.eval_batch_size, pl_module.device)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    # --- Lightning hooks --------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        requests = trainer.datamodule.requests
        log.info("scoring %d records on the unedited model", len(requests))
        self.pre = {r["case_id"]: r for r in self._score(pl_module, requests)}
        self._log(trainer, {f"pre/{k}": v for k, v in summarize(self.pre.values()).items()}, step=0)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: list[EditRequest],
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        handle = pl_module.last_handle
        try:
            for fn in self.on_edit:  # edit.save=patch, edit.show: before any restore
                fn(pl_module, handle, batch, batch_idx)
            post = self._score(pl_module, batch)
        finally:
            if self.mode != "sequential" and handle is not None:
                pl_module.restore(handle)
        lines = []
        for req, rec in zip(batch, post):
            lines.append({"case_id": req.case_id, "batch": batch_idx, "seconds": handle.seconds / len(batch),
                          "pre": self.pre[req.case_id], "post": rec, "info": _jsonable_info(handle.info)})
        with open(self.out / RECORDS_FILE, "a", encoding="utf-8") as f:  # one line per record, flushed per batch
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
        self.done.extend(lines)
        step_metrics = summarize(rec for rec in post)
        step_metrics["seconds_per_edit"] = handle.seconds / len(batch)
        self._log(trainer, {f"edit/{k}": v for k, v in step_metrics.items()}, step=batch_idx + 1)

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        done = self.done
        summary: dict[str, Any] = {
            "pre": summarize(d["pre"] for d in done),
            "post": summarize(d["post"] for d in done),
        }
        if self.mode == "sequential":
            requests = trainer.datamodule.requests
            log.info("re-scoring all %d edited records after the last edit (retention)", len(requests))
            final = self._score(pl_module, requests)
            summary["final"] = summarize(final)
            by_id = {r["case_id"]: r for r in final}
            for d in done:
                d["final"] = by_id.get(d["case_id"])
            summary["retention"] = retention_by_batch(done)
            write_text(self.out / RECORDS_FILE, "".join(json.dumps(d) + "\n" for d in done))
        seconds = sum(d["seconds"] for d in done)
        summary["timing"] = {
            "n_edits": len(done),
            "seconds_total_edit": seconds,
            "seconds_per_edit": seconds / max(1, len(done)),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        }
        summary["run"] = self.run_info | {"mode": self.mode}
        self.summary = summary
        flat = {f"{g}/{k}": v for g in ("pre", "post", "final") if g in summary for k, v in summary[g].items()}
        flat.update({f"timing/{k}": v for k, v in summary["timing"].items()})
        self._log(trainer, flat, step=len(done) + 1)
        paths = write_summary_files(self.out, summary)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image") and paths.get("plot"):
                lg.log_image(key="metrics", images=[str(paths["plot"])])
        print_table(summary)


def retention_by_batch(done: list[dict]) -> list[dict]:
    """Sequential mode: each batch's metrics right after it was applied (`post`) and after the last (`final`)."""
    batches = sorted({d["batch"] for d in done})
    return [{"batch": b, "post": summarize(d["post"] for d in done if d["batch"] == b),
             "final": summarize(d["final"] for d in done if d["batch"] == b and d.get("final"))} for b in batches]


def _jsonable_info(info: dict) -> dict:
    """Keep only JSON-friendly diagnostics (numbers, strings, short lists)."""
    out = {}
    for k, v in info.items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 64):
            out[k] = v
    return out
