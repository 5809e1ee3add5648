"""The lifelong-editing protocol (sequential mode): how a model holds up as edits accumulate.

Every `every` batches, `LifelongCallback` measures
- ES/PS/NS over the edits made so far (restricted to a fixed random sample of all records, drawn once up front,
  so a checkpoint's cost stays bounded and later checkpoints cover the earlier edits of the sample), each with
  its 95 % bootstrap interval over those records (`ci`, eval/intervals.py; the curves' bands),
- the perplexity of a fixed WikiText-2 slice (eval/perplexity.py: general ability),
- ‖W − W₀‖_F of every edited parameter (the accumulated ΔW per layer),
and appends one row to `lifelong.jsonl` (also logged as `lifelong/*`, step = edits so far). When perplexity
passes `collapse_factor` × its value on the unedited model the run stops with `Collapsed`: the pipeline then
writes the summary of the edits made up to the collapse and exits non-zero with the reason.
"""
from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import Collapsed, ConfigError
from kedit_pl.eval.block_inputs import BlockInputs
from kedit_pl.eval.intervals import intervals
from kedit_pl.eval.metrics import record_percent, summarize
from kedit_pl.eval.perplexity import perplexity
from kedit_pl.eval.scoring import score_requests
from kedit_pl.io import atomic_path, write_text
from kedit_pl.weights import snapshot

log = logging.getLogger(__name__)

ROWS_FILE = "lifelong.jsonl"
#: the rates each checkpoint row holds, with their intervals under `ci`
CURVE_RATES = ("es", "ps", "ns", "score")


@dataclass
class LifelongConfig:
    """`edit.lifelong` in conf/edit.yaml."""

    every: int = 1  # batches between checkpoints; 0 turns the protocol off
    sample: int | None = 200  # records in the fixed evaluation sample; null = all
    collapse_factor: float = 10.0  # stop when perplexity > factor × its start value; null = never
    perplexity: dict[str, Any] = field(default_factory=dict)  # corpus, n_tokens, seq_len, batch_size
    seed: int = 0

    @classmethod
    def from_any(cls, cfg: "LifelongConfig | Mapping[str, Any] | None") -> "LifelongConfig":
        """Build from a config mapping (or pass one through); an unknown field is a `ConfigError`."""
        if isinstance(cfg, LifelongConfig):
            return cfg
        cfg = dict(cfg or {})
        unknown = set(cfg) - {f.name for f in fields(cls)}
        if unknown:
            raise ConfigError(f"edit.lifelong: unknown field(s) {sorted(unknown)}")
        out = cls(**cfg)
        if int(out.every) < 0:
            raise ConfigError(f"edit.lifelong.every must be >= 0, got {out.every}")
        if out.sample is not None and int(out.sample) < 1:
            raise ConfigError(f"edit.lifelong.sample must be >= 1 or null, got {out.sample}")
        if out.collapse_factor is not None and not float(out.collapse_factor) > 1:
            raise ConfigError(f"edit.lifelong.collapse_factor must be > 1 or null, got {out.collapse_factor}")
        if out.every and not out.perplexity.get("corpus"):
            raise ConfigError("edit.lifelong.perplexity.corpus: a text file is required")
        return out


class LifelongCallback(L.Callback):
    """Tracks ES/PS/NS of the edits so far, perplexity and ‖ΔW‖ every `every` batches; stops on collapse."""

    def __init__(self, output_dir: str | Path, cfg: LifelongConfig | Mapping[str, Any],
                 eval_batch_size: int = 64) -> None:
        self.out, self.cfg = Path(output_dir), LifelongConfig.from_any(cfg)
        self.eval_batch_size = eval_batch_size
        self.rows: list[dict[str, Any]] = []
        self.edited: list[EditRequest] = []
        self.sample_ids: set[str] = set()
        self.start_ppl: float | None = None
        self.collapse: str | None = None
        self._w0: dict[str, torch.Tensor] = {}
        self._batches = 0
        self._resumed = 0  # batches made by the interrupted run this one continues (resume)
        self._written = 0  # rows already in lifelong.jsonl
        self._lower = BlockInputs()  # hidden states entering the lowest edited block, over the perplexity windows

    # --- measurements ---------------------------------------------------------------------------------
    def _perplexity(self, pl_module) -> float:
        p = self.cfg.perplexity
        with self._lower.for_method(pl_module):  # from the lowest block the edits touched (eval/block_inputs.py)
            return perplexity(pl_module.model, pl_module.tok, p["corpus"], int(p.get("n_tokens", 4096)),
                              int(p.get("seq_len", 512)), int(p.get("batch_size", 4)))

    def _row(self, pl_module) -> dict[str, Any]:
        t0 = time.perf_counter()
        sample = [r for r in self.edited if str(r.case_id) in self.sample_ids]
        scores = score_requests(pl_module.logits_fn(), pl_module.tok, sample, self.eval_batch_size,
                                pl_module.device) if sample else []
        metrics = summarize(scores) if scores else {}
        ci = intervals([record_percent(r) for r in scores])
        params = dict(pl_module.model.named_parameters())
        norms = {n: (params[n].detach().double() - w0.double()).norm().item() for n, w0 in self._w0.items()}
        row = {"batch": self._batches, "n_edits": len(self.edited), "n_scored": len(sample),
               **{k: metrics[k] for k in CURVE_RATES if k in metrics},
               "ci": {k: ci[k] for k in CURVE_RATES if k in ci},
               "perplexity": self._perplexity(pl_module), "delta_norm": norms,
               "delta_norm_total": sum(v * v for v in norms.values()) ** 0.5}
        row["seconds"] = time.perf_counter() - t0
        return row

    def _record(self, trainer: L.Trainer, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self._batches:  # the file appears with the first edit (an error before any edit leaves no files)
            with open(self.out / ROWS_FILE, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in self.rows[self._written:]))
            self._written = len(self.rows)
        flat = {f"lifelong/{k}": v for k, v in row.items() if isinstance(v, (int, float))}
        for lg in trainer.loggers:
            lg.log_metrics(flat, step=row["n_edits"])
        log.info("lifelong after %d edits: %s", row["n_edits"],
                 {k: round(v, 2) for k, v in row.items() if isinstance(v, float)})

    # --- Lightning hooks --------------------------------------------------------------------------------
    def on_test_start(self, trainer: L.Trainer, pl_module) -> None:
        requests = self.edited + trainer.datamodule.requests  # (edited: by the run a resume continues)
        self._w0 = snapshot(pl_module.model, pl_module.edited_parameters(requests))  # the unedited weights
        if self._resumed:  # the rows so far are the checkpoint's
            write_text(self.out / ROWS_FILE, "".join(json.dumps(r) + "\n" for r in self.rows))
            return
        ids = [str(r.case_id) for r in requests]
        n = len(ids) if self.cfg.sample is None else min(int(self.cfg.sample), len(ids))
        self.sample_ids = set(random.Random(self.cfg.seed).sample(ids, n))
        (self.out / ROWS_FILE).unlink(missing_ok=True)
        row = self._row(pl_module)
        self.start_ppl = row["perplexity"]
        self._record(trainer, row)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch: list[EditRequest],
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        self._batches += 1
        self.edited.extend(batch)
        total = self._resumed + trainer.num_test_batches[0] if trainer.num_test_batches else None
        if self._batches % int(self.cfg.every) and self._batches != total:
            return
        row = self._row(pl_module)
        self._record(trainer, row)
        limit = self.collapse_limit
        if limit is not None and row["perplexity"] > limit:
            self.collapse = (f"collapse after {row['n_edits']} edits: WikiText-2 perplexity {row['perplexity']:.1f} "
                             f"> {self.cfg.collapse_factor:g} x its start {self.start_ppl:.1f}")
            raise Collapsed(self.collapse)

    @property
    def collapse_limit(self) -> float | None:
        """The perplexity past which this run stops as collapsed (None: never)."""
        return collapse_limit(self.cfg.collapse_factor, self.start_ppl)

    def state(self) -> dict[str, Any]:
        """What a resumed sequential run needs to go on (kedit_pl/sequential_state.py)."""
        return {"rows": self.rows, "sample_ids": sorted(self.sample_ids), "start_perplexity": self.start_ppl}

    def resume(self, state: dict[str, Any], edited: list[EditRequest], batches: int) -> None:
        """Continue after `batches` batches that edited `edited`, from their `state()`."""
        self.rows, self.sample_ids = list(state["rows"]), set(state["sample_ids"])
        self.start_ppl, self.edited = state["start_perplexity"], list(edited)
        self._batches = self._resumed = batches
        self._written = len(self.rows)

    def summary(self) -> dict[str, Any]:
        """What `summary.json` keeps of the study: start perplexity, collapse, cadence, sample size, the rows."""
        return {"start_perplexity": self.start_ppl, "collapsed": self.collapse, "every": self.cfg.every,
                "sample": len(self.sample_ids), "rows": self.rows}


def collapse_limit(factor: float | None, start_perplexity: float | None) -> float | None:
    """The perplexity past which a run stops as collapsed: `collapse_factor` × its unedited perplexity (None:
    never, or not known)."""
    return None if factor is None or start_perplexity is None else float(factor) * float(start_perplexity)


def plot_curves(curves: Mapping[str, list[dict[str, Any]]], path: str | Path,
                collapse_limit: float | None = None) -> Path:
    """ES, PS, NS, perplexity and total ‖ΔW‖ against the number of edits, one line per curve (method), ES/PS/NS
    with their 95 % bootstrap bands where the rows hold them; the perplexity panel marks `collapse_limit`, where a
    run stops as collapsed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("es", "ES (edits so far)"), ("ps", "PS"), ("ns", "NS"), ("perplexity", "WikiText-2 perplexity"),
              ("delta_norm_total", "‖ΔW‖_F (all edited layers)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8))
    for label, rows in curves.items():
        for ax, (key, _) in zip(axes, panels):
            pts = [(r["n_edits"], r[key]) for r in rows if key in r]
            if pts:
                line, = ax.plot(*zip(*pts), marker="o", ms=3, label=label)
            band = [(r["n_edits"], *r["ci"][key]) for r in rows if key in (r.get("ci") or {})]
            if len(band) > 1:
                x, lo, hi = zip(*band)
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, lw=0)
    for ax, (key, title) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("edits")
        if key == "perplexity":
            ax.set_yscale("log")
            if collapse_limit is not None:
                ax.axhline(collapse_limit, color="grey", ls=":", lw=1)
                ax.annotate("collapse", (0, collapse_limit), textcoords="offset points", xytext=(2, 2),
                            fontsize=7, color="grey", xycoords=("axes fraction", "data"))
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))  # the legend below the panels, clear of the curves
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
