"""EditEvalCallback: measures every edit before and after, logs, writes results, restores per mode."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.distributed import gather_objects
from kedit_pl.errors import ConfigError
from kedit_pl.eval.groups import GroupRunner, MetricGroup
from kedit_pl.eval.groups.base import stopwatch
from kedit_pl.eval.intervals import LEVEL, RESAMPLES, SEED, intervals
from kedit_pl.eval.metrics import metric_counts, summarize
from kedit_pl.eval.pre_cache import cached_pre_scores, pre_cache_for
from kedit_pl.eval.record_values import values_by_state
from kedit_pl.eval.row_states import EditedSystem, capture, edited_state, held_bytes
from kedit_pl.eval.report import print_table, write_summary_files
from kedit_pl.eval.samples import (generate_samples, generate_samples_states, sample_prompts, sample_rows,
                                   write_samples)
from kedit_pl.eval.scoring import PrefixStore, reuse_prefixes, score_requests
from kedit_pl.io import write_text
from kedit_pl.run_folder import RANK_RECORDS, TIMING_FILE, rank_record_files

log = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
RECORDS_FILE = "records.jsonl"
INVOCATION_ENV = "KEDIT_INVOCATION"  # one id per invocation, inherited by the DDP ranks it launches
#: the sampled records' generations (eval.samples): a part of `clock`, and a `skip` entry that defers them
SAMPLES = "samples"


def new_invocation() -> str:
    """A fresh id for this run (rank 0; the DDP ranks it launches inherit it): it tells a resumed run's record lines
    from the earlier runs'."""
    os.environ[INVOCATION_ENV] = f"{os.getpid()}-{time.time():.6f}"
    return os.environ[INVOCATION_ENV]


def wall_seconds(done: list[dict], invocation: str, since: float) -> float | None:
    """Wall time of the whole run: this invocation's since `since` (perf_counter) plus, on a resume, each earlier
    invocation's up to its last record line (`elapsed`). None when an earlier line predates the `elapsed` field."""
    earlier: dict[str, float] = {}
    for d in done:
        inv = d.get("invocation")
        if inv is None:
            return None
        if inv != invocation:
            earlier[inv] = max(earlier.get(inv, 0.0), float(d.get("elapsed", 0.0)))
    return sum(earlier.values()) + time.perf_counter() - since


def read_done_records(output_dir: str | Path) -> list[dict]:
    """Per-record results already written by an interrupted run: records.jsonl, then the per-rank files of a DDP run
    not merged yet (a torn last line is ignored)."""
    paths = [Path(output_dir) / RECORDS_FILE] + rank_record_files(output_dir)
    by_id: dict[str, dict] = {}
    n = 0
    for path in (p for p in paths if p.exists()):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                log.warning("ignoring a torn line in %s", path)
                continue
            n += 1
            by_id[str(d["case_id"])] = d  # a case_id written twice counts once (its last line, first position)
    if n > len(by_id):
        log.warning("%s: %d duplicate line(s) by case_id ignored (each record counts once)", output_dir, n - len(by_id))
    return list(by_id.values())


class EditEvalCallback(L.Callback):
    """Pre-metrics on the unedited model, post-metrics right after each batch of edits.

    mode=single/batch: restore after each batch. mode=sequential: keep edits, and re-evaluate every
    edited record at the end (`final/...`, i.e. retention after all edits).

    Under DDP each rank scores and records its share (EditDataModule.rank_part) in records.rank<r>.jsonl; at the end
    rank 0 gathers every rank's lines through the strategy, writes records.jsonl (in run order) and summary.json,
    and is the only rank that logs (per-batch metrics then in batch order).
    """

    def __init__(self, output_dir: str | Path, mode: str = "single", eval_batch_size: int = 64,
                 resume: bool = False, run_info: dict[str, Any] | None = None,
                 groups: list[MetricGroup] | None = None, samples: int = 0, sample_tokens: int = 40,
                 pre_cache: str | Path | None = None, on_edit: list[Callable] | None = None,
                 started: float | None = None, states_per_forward: int = 1, states_max_mb: float = 2048,
                 prefix_cache_mb: float = 1024) -> None:
        if mode not in MODES:
            raise ValueError(f"edit.mode: must be one of {MODES}, got {mode!r}")
        self.out = Path(output_dir)
        self.mode = mode
        self.eval_batch_size = eval_batch_size
        self.run_info = run_info or {}
        self.pre_cache = pre_cache  # folder of cached pre-edit scores (eval.cache_pre), or None
        self.on_edit = list(on_edit or [])  # fn(method, handle, batch, batch_idx) while the edit is in place
        self.invocation = os.environ.get(INVOCATION_ENV) or new_invocation()
        self.started = time.perf_counter() if started is None else started  # this invocation's start (wall time)
        self.done = read_done_records(self.out) if resume else []
        self.pre: dict[str, dict] = {}
        self.summary: dict[str, Any] = {}
        self.groups = GroupRunner(groups or [], mode)  # metric groups beyond ES/PS/NS (eval.metrics)
        self.n_samples, self.sample_tokens = int(samples), int(sample_tokens)
        self.sample_ids: set[str] = set()
        self.new: list[dict] = []  # the lines this process wrote in this run
        self.prior: list[EditRequest] = []  # sequential resume: the records the interrupted run edited
        # a resume's batch numbers (records.jsonl's `batch`, the loggers' edit/* steps) go on after the earlier runs'
        self.batch_offset = 1 + max((int(d.get("batch", -1)) for d in self.done), default=-1)
        # single/batch mode: the generations of up to this many edited records share forwards (eval/row_states.py);
        # their record lines wait in `pending` (lines, requests, each request's edited system) until then
        if isinstance(states_per_forward, bool) or not isinstance(states_per_forward, int) or states_per_forward < 1:
            raise ConfigError(f"eval.states_per_forward: must be an integer >= 1, got {states_per_forward!r}")
        if isinstance(states_max_mb, bool) or not isinstance(states_max_mb, (int, float)) or not states_max_mb > 0:
            raise ConfigError(f"eval.states_max_mb: must be a number > 0, got {states_max_mb!r}")
        self.states_per_forward = states_per_forward
        self.states_max_bytes = float(states_max_mb) * 2**20  # ... or until their copied weights hold this much
        self.pending: list[tuple[list[dict], list[EditRequest], list[EditedSystem]]] = []
        # long shared prefixes' key/value caches (scoring.PrefixStore): kept for one edited state, or for the run
        if isinstance(prefix_cache_mb, bool) or not isinstance(prefix_cache_mb, (int, float)) or prefix_cache_mb < 0:
            raise ConfigError(f"eval.prefix_cache_mb: must be a number >= 0, got {prefix_cache_mb!r}")
        self.prefix_cache_mb = float(prefix_cache_mb)
        self.run_prefixes: PrefixStore | None = None
        # this invocation's seconds per phase (pre, post, final) and part (es_ps_ns, each group, samples)
        self.clock: dict[str, dict[str, float]] = {}

    def resume_sequential(self, edited: list[EditRequest], batches: int) -> None:
        """Continue a sequential run after `batches` batches that edited `edited` (their lines are in records.jsonl):
        batch numbers go on, and the final re-scoring covers them too."""
        self.prior, self.batch_offset = list(edited), batches

    # --- helpers -------------------------------------------------------------------------------------
    def _prefixes(self, pl_module) -> PrefixStore | None:
        """Where `prefill` may keep and find prefixes while the models' weights stay put: one store for the whole
        run when the method's routes never change (IKE, SERAC: frozen models), else a new one per edited state."""
        if self.prefix_cache_mb <= 0:
            return None
        if getattr(pl_module, "fixed_routes", False):
            if self.run_prefixes is None:
                self.run_prefixes = PrefixStore(self.prefix_cache_mb)
            return self.run_prefixes
        return PrefixStore(self.prefix_cache_mb)

    def _score(self, pl_module, requests: list[EditRequest], batch_idx: int | None = None,
               phase: str = "post", state: bool = True, skip: tuple[str, ...] = ()) -> list[dict]:
        """ES/PS/NS scores of each request, plus the selected metric groups (model-state groups only with `state`:
        one DDP rank measures a state; those named in `skip` later, in a shared forward) and, for sampled records,
        generations (later too, when `skip` names `SAMPLES`). `phase`: pre (the unedited model), post or final. Pre-edit scores and group measurements come
        from the on-disk cache when it is enabled (eval.cache_pre). The time of each part goes to `clock[phase]`."""
        if not requests:  # a rank's share of a small shared batch
            return []
        clock = self.clock.setdefault(phase, {})
        logits_fn = pl_module.logits_fn()
        cache = pre_cache_for(self.pre_cache, logits_fn, pl_module.tok) if phase == "pre" else None
        with stopwatch(clock, "es_ps_ns"):
            recs = cached_pre_scores(cache, logits_fn, pl_module.tok, requests, self.eval_batch_size,
                                     pl_module.device, score_requests)
        self.groups.measure(pl_module, requests, recs, batch_idx, cache=cache, state=state, skip=skip, clock=clock)
        sampled = [(req, rec) for req, rec in zip(requests, recs)
                   if req.case_id in self.sample_ids and SAMPLES not in skip]
        if sampled:
            compute = lambda reqs: generate_samples(pl_module, reqs, self.sample_tokens)  # noqa: E731
            reqs = [r for r, _ in sampled]
            with stopwatch(clock, SAMPLES):
                smps = (cache.per_record({"samples": self.sample_tokens}, reqs, compute, "pre-edit samples")
                        if cache is not None else compute(reqs))
            for (_, rec), smp in zip(sampled, smps):
                rec["samples"] = smp
        return recs

    def _numbers(self, records: list[dict], pre: list[dict] | None = None) -> dict[str, float]:
        return summarize(records) | self.groups.summarize(records, pre)

    @staticmethod
    def _log(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step)

    # --- Lightning hooks --------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        requests = trainer.datamodule.requests
        done_ids = {d["case_id"] for d in self.done}
        pool = self.prior + requests  # the first k records of the run have samples (prior: a sequential resume's)
        self.sample_ids = {r.case_id for r in pool[:max(0, self.n_samples - len(done_ids) + len(self.prior))]}
        # a resumed sequential run scores its earlier records again: each score then comes from the same batch of
        # prompts as in a run that never stopped (float32 logits depend a little on the batch's padding)
        mine = trainer.datamodule.rank_requests() if trainer.world_size > 1 else self.prior + requests
        log.info("scoring %d records on the unedited model", len(mine))
        self.pre = {r["case_id"]: r for r in self._score(pl_module, mine, phase="pre", state=trainer.is_global_zero)}
        if trainer.world_size == 1:  # under DDP rank 0 logs every rank's numbers at the end
            self._log(trainer, {f"pre/{k}": v for k, v in self._numbers(list(self.pre.values())).items()}, step=0)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: list[EditRequest],
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        handle = pl_module.last_handle
        dm = trainer.datamodule
        step = (dm.global_batch(batch_idx) if trainer.world_size > 1 else batch_idx) + self.batch_offset
        mine = dm.rank_part(batch) if trainer.world_size > 1 else batch
        shared = self._shares_forward(pl_module)
        systems: list[EditedSystem | None] | None = None
        try:
            if not (dm.shared_batches and trainer.global_rank):  # a shared batch's edit is saved/shown once
                for fn in self.on_edit:  # edit.save=patch, edit.show: before any restore
                    fn(pl_module, handle, batch, step)
            if shared and mine:  # what each record's generations need once the edit is undone
                weights = edited_state(pl_module.model, handle)
                systems = [capture(pl_module, weights, self.groups.shared_prompts(r) + self._sample_prompts(r))
                           for r in mine]
                systems = None if any(s is None for s in systems) else systems
            with reuse_prefixes(self._prefixes(pl_module)):
                post = self._score(pl_module, mine, step, state=bool(mine) and mine[0] is batch[0],
                                   skip=(*shared, SAMPLES) if systems is not None else ())
        finally:
            if self.mode != "sequential" and handle is not None:
                pl_module.restore(handle)
        lines = []
        for req, rec in zip(mine, post):
            lines.append({"case_id": req.case_id, "batch": step, "seconds": handle.seconds / len(batch),
                          "pre": self.pre[req.case_id], "post": rec, "info": _jsonable_info(handle.info),
                          "invocation": self.invocation})
        if systems is not None:
            self.pending.append((lines, list(mine), systems))
            held = held_bytes(st for _, _, sts in self.pending for st in sts)
            if sum(len(reqs) for _, reqs, _ in self.pending) >= self.states_per_forward or held >= self.states_max_bytes:
                self._flush(trainer, pl_module)
        else:
            self._flush(trainer, pl_module)  # earlier lines first: records.jsonl keeps the run's order
            self._write(trainer, lines)

    def _sample_prompts(self, req: EditRequest) -> list[str]:
        """The prompts of `req`'s samples when it is a sampled record (generated in the shared forward too)."""
        return list(sample_prompts(req).values()) if req.case_id in self.sample_ids else []

    def _shares_forward(self, pl_module) -> list[str]:
        """The groups this run measures for many edited records in shared forwards (none: each record right after
        its edit): single/batch mode with `states_per_forward` > 1; `row_states.capture` then decides per batch
        whether the method's edited systems survive the undo."""
        if self.mode == "sequential" or self.states_per_forward <= 1:
            return []
        return self.groups.shared_forward()

    def _flush(self, trainer: L.Trainer, pl_module) -> None:
        """Measure the pending records' deferred groups, each under its edited state, in shared batches; write them."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        n = sum(len(reqs) for _, reqs, _ in pending)
        log.debug("measuring %d edited states in shared forwards", n)
        requests = [r for _, reqs, _ in pending for r in reqs]
        systems = [st for _, _, sts in pending for st in sts]
        clock = self.clock.setdefault("post", {})
        with reuse_prefixes(self._prefixes(pl_module)):
            self.groups.measure_states(pl_module, requests, [d["post"] for lines, _, _ in pending for d in lines],
                                       systems, clock=clock)
        sampled = [(d["post"], req, st) for lines, reqs, sts in pending for d, req, st in zip(lines, reqs, sts)
                   if req.case_id in self.sample_ids]
        if sampled:
            with stopwatch(clock, SAMPLES):
                smps = generate_samples_states(pl_module, [r for _, r, _ in sampled], [st for *_, st in sampled],
                                               self.sample_tokens)
            for (post, _, _), smp in zip(sampled, smps):
                post["samples"] = smp
        for lines, _, _ in pending:
            self._write(trainer, lines)

    def _write(self, trainer: L.Trainer, lines: list[dict]) -> None:
        """Append one batch's record lines to this rank's records file (flushed), keep them, log them."""
        for line in lines:
            line["elapsed"] = round(time.perf_counter() - self.started, 3)
        name = RECORDS_FILE if trainer.world_size == 1 else RANK_RECORDS.format(rank=trainer.global_rank)
        with open(self.out / name, "a", encoding="utf-8") as f:  # one line per record, flushed per batch
            for line in lines:
                f.write(json.dumps(line) + "\n")
            f.flush()
        self.done.extend(lines)
        self.new.extend(lines)
        if trainer.world_size == 1 and lines:
            self._log_batch(trainer, lines)
            # the time behind the lines just written: {"invocation", "clock"} (a resumed run's summary adds them up)
            with open(self.out / TIMING_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps({"invocation": self.invocation, "clock": self.clock}) + "\n")

    def phase_seconds(self, earlier_runs: bool = True) -> dict[str, dict[str, float]]:
        """Seconds per phase and part: this invocation's, plus (`earlier_runs`, a resumed single-process run) each
        earlier invocation's as of its last written records (`TIMING_FILE`; the work of records it lost is not
        counted, they were redone)."""
        earlier = {d.get("invocation") for d in self.done} - {self.invocation, None} if earlier_runs else set()
        last: dict[str, dict] = {}
        path = self.out / TIMING_FILE
        for line in path.read_text(encoding="utf-8").splitlines() if earlier and path.is_file() else []:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a torn last line of a killed run
                continue
            if entry.get("invocation") in earlier:
                last[entry["invocation"]] = entry["clock"]
        total: dict[str, dict[str, float]] = {}
        for clock in [*last.values(), self.clock]:
            for phase, parts in clock.items():
                sums = total.setdefault(phase, {})
                for part, sec in parts.items():
                    sums[part] = sums.get(part, 0.0) + sec
        return {ph: {k: round(v, 2) for k, v in parts.items()} for ph, parts in total.items()}

    def _log_batch(self, trainer: L.Trainer, lines: list[dict]) -> None:
        """`edit/*` of one batch (its records' lines), at step batch + 1."""
        step_metrics = self._numbers([d["post"] for d in lines], [d["pre"] for d in lines])
        step_metrics["seconds_per_edit"] = lines[0]["seconds"]
        self._log(trainer, {f"edit/{k}": v for k, v in step_metrics.items()}, step=lines[0]["batch"] + 1)

    def _gather(self, trainer: L.Trainer) -> list[float] | None:
        """DDP: every rank's new lines to rank 0 (they join the lines of earlier runs, when resuming); rank 0 logs them
        batch by batch. Returns each rank's peak RSS (MB) on rank 0, None on the other ranks (they are done)."""
        parts = gather_objects(trainer.strategy, (self.new, _peak_rss_mb()))
        if not trainer.is_global_zero:
            return None
        new = [d for lines, _ in parts for d in lines]
        new_ids = {d["case_id"] for d in new}
        self.done = [d for d in self.done if d["case_id"] not in new_ids] + new
        self._log(trainer, {f"pre/{k}": v for k, v in self._numbers([d["pre"] for d in new]).items()}, step=0)
        for b in sorted({d["batch"] for d in new}):
            self._log_batch(trainer, [d for d in new if d["batch"] == b])
        return [rss for _, rss in parts]

    def _merge_records(self, positions: dict[str, int]) -> None:
        """One records.jsonl holding every record once in run order (`positions`: case_id -> place in the selection),
        written atomically; then the per-rank files go."""
        parts = rank_record_files(self.out)
        if parts:
            self.done.sort(key=lambda d: positions.get(d["case_id"], len(positions)))
            write_text(self.out / RECORDS_FILE, "".join(json.dumps(d) + "\n" for d in self.done))
            for p in parts:
                p.unlink()

    def on_test_end(self, trainer: L.Trainer, pl_module) -> None:
        self._flush(trainer, pl_module)
        rss = self._gather(trainer) if trainer.world_size > 1 else [_peak_rss_mb()]
        if rss is None:
            return
        self._merge_records(trainer.datamodule.positions)
        done = self.done
        pres = [d["pre"] for d in done]
        summary: dict[str, Any] = {"pre": self._numbers(pres), "post": self._numbers([d["post"] for d in done], pres)}
        if self.mode == "sequential":
            requests = self.prior + trainer.datamodule.requests
            log.info("re-scoring all %d edited records after the last edit (retention)", len(requests))
            final = self._score(pl_module, requests, phase="final")
            by_id = {r["case_id"]: r for r in final}
            summary["final"] = self._numbers([by_id.get(d["case_id"]) or {} for d in done], pres)
            for d in done:
                d["final"] = by_id.get(d["case_id"])
            summary["retention"] = retention_by_batch(done)
            write_text(self.out / RECORDS_FILE, "".join(json.dumps(d) + "\n" for d in done))
        summary["n_per_metric"] = metric_counts(d["post"] for d in done)  # each metric's own n (n_records: all)
        summary["ci"] = {st: intervals(v, RESAMPLES, SEED, LEVEL) for st, v in values_by_state(done, self.groups).items()}
        summary["ci_method"] = {"kind": "percentile bootstrap over records", "level": LEVEL, "resamples": RESAMPLES,
                                "seed": SEED}
        seconds = sum(d["seconds"] for d in done)
        summary["timing"] = {
            "n_edits": len(done),
            "seconds_total_edit": seconds,
            "seconds_per_edit": seconds / max(1, len(done)),
            "peak_rss_mb": max(rss),
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
        }
        # under DDP: this invocation, rank 0 (the ranks write no TIMING_FILE)
        summary["timing"]["seconds_by_phase"] = self.phase_seconds(earlier_runs=trainer.world_size == 1)
        if trainer.world_size > 1:
            summary["timing"] |= {"processes": trainer.world_size, "peak_rss_mb_per_rank": rss}
        info = mean_info(done)
        if info:
            summary["edit_info"] = info
        if self.groups.groups:
            summary["metric_groups"] = self.groups.counts(done)
        summary["run"] = self.run_info | {"mode": self.mode}
        self.summary = summary
        flat = {f"{g}/{k}": v for g in ("pre", "post", "final") if g in summary for k, v in summary[g].items()}
        flat.update({f"{g}/{k}_{end}": b for g, cis in summary["ci"].items() for k, ci in cis.items()
                     for end, b in zip(("lo", "hi"), ci)})  # the 95 % bounds beside each aggregate
        flat.update({f"timing/{k}": v for k, v in summary["timing"].items() if isinstance(v, (int, float))})
        flat.update({f"timing/{ph}/{k}": v for ph, parts in summary["timing"]["seconds_by_phase"].items()
                     for k, v in parts.items()})
        self._log(trainer, flat, step=len(done) + 1)
        set_run_summary(trainer.loggers, flat)
        paths = write_summary_files(self.out, summary)
        for lg in trainer.loggers:
            if hasattr(lg, "log_image") and paths.get("plot"):
                lg.log_image(key="metrics", images=[str(paths["plot"])])
        run = summary["run"]
        write_samples(self.out, sample_rows(done), trainer.loggers, f"{run.get('method', '')} on {run.get('model', '')}")
        print_table(summary)


def mean_info(done: list[dict]) -> dict[str, float]:
    """The mean over records of each number a method reports per edit (`info`: MEMIT's z_steps_mean, ...)."""
    infos = [d.get("info") or {} for d in done]
    numbers = lambda i: {k: v for k, v in i.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}  # noqa: E731
    keys = sorted({k for i in infos for k in numbers(i)})
    return {k: sum(vals) / len(vals) for k in keys if (vals := [numbers(i)[k] for i in infos if k in numbers(i)])}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_run_summary(loggers: list, flat: dict[str, float]) -> None:
    """A W&B run's summary defaults to each key's last logged value, i.e. the last record's `edit/...`; make it
    show the run's aggregates instead, and the per-edit keys the mean over all records (= `post/...`)."""
    for lg in loggers:
        summary = getattr(getattr(lg, "experiment", None), "summary", None)
        if summary is None or not hasattr(summary, "update"):
            continue
        per_edit = {f"edit/{k.removeprefix('post/')}": v for k, v in flat.items() if k.startswith("post/")}
        per_edit["edit/seconds_per_edit"] = flat.get("timing/seconds_per_edit")
        summary.update(flat | per_edit)


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
