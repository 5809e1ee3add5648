"""Record selection and the LightningDataModule that feeds batches of EditRequest to a method."""
from __future__ import annotations

import logging
import random
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning as L
from torch.utils.data import DataLoader

from kedit_pl.data.readers import merge_probes, read_requests
from kedit_pl.data.requests import EditRequest
from kedit_pl.data.splits import apply_split, ids_digest
from kedit_pl.distributed import rank_world, share
from kedit_pl.errors import ConfigError, InvalidRecord
from kedit_pl.io import write_json

log = logging.getLogger(__name__)


def parse_range(spec: str | Sequence[int] | None) -> tuple[int, int] | None:
    """'100:200' or [100, 200] -> (100, 200), a half-open slice of record positions."""
    if spec is None:
        return None
    try:
        lo, hi = (spec.split(":") if isinstance(spec, str) else spec)
        return int(lo), int(hi)
    except (ValueError, TypeError):
        raise ConfigError(f"dataset.range: expected 'START:END', got {spec!r}") from None


def load_split(path: str, fmt: str, on_invalid: str = "error") -> list[EditRequest]:
    """Read and validate every record; invalid records raise, or are skipped with a warning on request."""
    return load_split_and_skips(path, fmt, on_invalid)[0]


#: the run-folder file listing the training records dataset.train.on_invalid=skip dropped (train.py)
SKIPPED_TRAIN = "skipped_train_records.json"


def load_split_and_skips(path: str, fmt: str, on_invalid: str = "error",
                         listed_in: str | None = None) -> tuple[list[EditRequest], list[dict]]:
    """`load_split`, plus the skipped records as [{"case_id", "reason"}]. Skips are said in one warning line (a
    count and the first reason; `listed_in` names where the caller lists them all), never one line per record."""
    if on_invalid not in ("error", "skip"):
        raise ConfigError(f"dataset.on_invalid: must be 'error' or 'skip', got {on_invalid!r}")
    good, bad = [], []
    for req, err in read_requests(fmt, path):
        (good.append(req) if err is None else bad.append(err))
    if bad and on_invalid == "error":
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InvalidRecord(f"{bad[0]}{more}; fix the data or set dataset.on_invalid=skip")
    if bad:
        log.warning("skipped %d invalid records of %d in %s (the first: %s)%s", len(bad), len(bad) + len(good), path,
                    bad[0], f"; all of them are listed in {listed_in}" if listed_in else "")
    return good, [{"case_id": getattr(e, "case_id", None), "reason": f"invalid record: {e}"} for e in bad]


def select(requests: list[EditRequest], limit: int | None = None, range_: Any = None,
           ids: Sequence[Any] | None = None, exclude_ids: set[str] | None = None) -> list[EditRequest]:
    """Pick records by ids (in the given order), else by a position range, then keep the first `limit`."""
    if ids:
        by_id = {r.case_id: r for r in requests}
        missing = [i for i in map(str, ids) if i not in by_id]
        if missing:
            raise ConfigError(f"dataset.ids: case_id {missing[0]} not in the dataset")
        chosen = [by_id[str(i)] for i in ids]
    else:
        r = parse_range(range_)
        chosen = requests[r[0]:r[1]] if r else list(requests)
        if r:
            _check_range(r, len(chosen), len(requests))
    if limit is not None:
        if int(limit) < 1:
            raise ConfigError(f"dataset.limit: must be >= 1, got {limit}")
        chosen = chosen[: int(limit)]
    if not chosen:
        raise ConfigError("dataset: the selection (limit/range/ids) picked no records")
    return [r for r in chosen if r.case_id not in exclude_ids] if exclude_ids else chosen


def _check_range(r: tuple[int, int], n_chosen: int, n_all: int) -> None:
    """A range reaching past the file's end is said (how many of the asked records exist); none existing is an error."""
    lo, hi = r
    if hi <= lo or lo < 0:
        raise ConfigError(f"dataset.range: {lo}:{hi} is not a range of positions (need 0 <= START < END)")
    if n_chosen == 0:
        raise ConfigError(f"dataset.range: {lo}:{hi} asks for positions past the end of the file, which holds "
                          f"{n_all} records (positions 0..{n_all - 1}); none of the {hi - lo} asked records exist")
    if n_chosen < hi - lo:
        log.warning("dataset.range=%d:%d asks for %d records but the file holds %d (positions 0..%d): only %d of them "
                    "exist (%d..%d), and only those run", lo, hi, hi - lo, n_all, n_all - 1, n_chosen, lo, lo + n_chosen - 1)


def fact_key(req: EditRequest) -> tuple[str, str]:
    """A record's fact, independent of its file's case_id scheme: (subject, rewrite prompt), case-folded."""
    return req.subject.strip().casefold(), " ".join(req.rewrite.split()).casefold()


def drop_eval_facts(train: list[EditRequest], eval_path: str, eval_format: str, train_path: str) -> list[EditRequest]:
    """Training records minus every fact of the evaluation file (learned editors never see a test fact)."""
    held_out = {fact_key(r) for r, _ in read_requests(eval_format, eval_path) if r is not None}
    kept = [r for r in train if fact_key(r) not in held_out]
    if len(kept) < len(train):
        log.info("train split: dropped %d of %d records of %s whose fact is in the evaluation file %s "
                 "(dataset.train.exclude_eval)", len(train) - len(kept), len(train), train_path, eval_path)
    return kept


def _collate(batch: list[EditRequest]) -> list[EditRequest]:
    return batch


def _rank_slice(batch: list[EditRequest], rank: int, world: int) -> list[EditRequest]:
    """Rank `rank`'s contiguous part of a global training batch (its length is a multiple of `world`)."""
    n = len(batch) // world
    return batch[rank * n:(rank + 1) * n]


class EditDataModule(L.LightningDataModule):
    """Test batches are the edits (`edit_batch_size` records each); train/val serve learned editors.

    Under DDP (the Trainer runs with `use_distributed_sampler=False`; the shares are chosen here):
    - edits: whole batches go round-robin to the ranks, the same batches as in one process; with `shared_batches`
      (a method that splits a batch's work among ranks) every rank gets every batch and evaluates its share of it;
    - training: every rank draws the same shuffled global batch of `world × train_batch_size` records and takes its
      own slice, so a step sees what one process sees with the batch `world` times larger.
    """

    def __init__(self, cfg: Mapping[str, Any], edit_batch_size: int = 1, train_batch_size: int = 8,
                 exclude_ids: set[str] | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.edit_batch_size = int(edit_batch_size)
        self.train_batch_size = int(train_batch_size)
        self.exclude_ids = exclude_ids or set()
        self.seed = seed
        self.requests: list[EditRequest] = []
        self.done_requests: list[EditRequest] = []  # the selection's records in exclude_ids (done by an earlier run)
        self.invalid: list[dict] = []  # records dataset.on_invalid=skip dropped: [{"case_id", "reason"}]
        self.positions: dict[str, int] = {}  # case_id -> position in the selection, records done earlier included
        self.selection: dict[str, Any] = {}  # the split and the digest of the selection's case_ids (summary.json)
        self.train_requests: list[EditRequest] = []
        self.val_requests: list[EditRequest] = []
        self.train_invalid: list[dict] = []  # training records dataset.train.on_invalid=skip dropped
        self.shared_batches = False  # DDP: every rank gets every edit batch (EditMethod.can_share_batches)

    def prepare_requests(self) -> list[EditRequest]:
        """Read, validate and select the records (with probe fields merged in); returns the chosen requests."""
        c = self.cfg
        all_reqs, self.invalid = load_split_and_skips(c["path"], c.get("format", "counterfact"),
                                                      c.get("on_invalid", "error"), "summary.json (run.skipped)")
        split = c.get("split") or "all"
        in_split = apply_split(all_reqs, split, c.get("split_rule"))  # limit / range / ids act within the split
        try:
            chosen = select(in_split, c.get("limit"), c.get("range"), c.get("ids"))
        except ConfigError as e:
            if split == "all":
                raise
            raise ConfigError(f"{e} (within dataset.split={split}: {len(in_split)} of {len(all_reqs)} records)") from None
        self.selection = {"split": split, "split_rule": c.get("split_rule"), "n_selected": len(chosen),
                          "records_sha256": ids_digest(r.case_id for r in chosen)}
        if c.get("merge"):  # probe fields of the same records from other files (metric groups)
            chosen = merge_probes(chosen, c.get("format", "counterfact"), c["merge"])
        self.positions = {r.case_id: i for i, r in enumerate(chosen)}
        self.requests = [r for r in chosen if r.case_id not in self.exclude_ids] if self.exclude_ids else chosen
        self.done_requests = [r for r in chosen if r.case_id in self.exclude_ids]
        return self.requests

    def prepare_training(self, run_dir: str | Path | None = None) -> None:
        """Train split from `dataset.train`, with `val_fraction` of it held out for validation. Records skipped as
        invalid are listed in `run_dir`/skipped_train_records.json (and in `self.train_invalid`)."""
        t = self.cfg.get("train")
        if not t:
            raise ConfigError(f"dataset '{self.cfg.get('name')}' has no 'train' split configured")
        listed = Path(run_dir) / SKIPPED_TRAIN if run_dir is not None else None
        reqs, self.train_invalid = load_split_and_skips(t["path"], t.get("format", self.cfg.get("format")),
                                                        t.get("on_invalid", "skip"), str(listed) if listed else None)
        if listed and self.train_invalid:
            write_json(listed, self.train_invalid)
        if t.get("exclude_eval", True):
            reqs = drop_eval_facts(reqs, self.cfg["path"], self.cfg.get("format"), t["path"])
        rng = random.Random(self.seed)
        reqs = list(reqs)
        rng.shuffle(reqs)
        n_val = max(1, int(len(reqs) * float(t.get("val_fraction", 0.05))))
        if t.get("limit"):
            reqs = reqs[: int(t["limit"]) + n_val]
        self.val_requests, self.train_requests = reqs[:n_val], reqs[n_val:]

    def setup(self, stage: str | None = None) -> None:
        if stage in ("test", None) and not self.requests:
            self.prepare_requests()
        if stage in ("fit", "validate") and not self.train_requests:
            self.prepare_training()

    # --- edits -------------------------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        return rank_world(self.trainer)

    def edit_batches(self) -> list[list[EditRequest]]:
        """Every batch of edits of the run, in order (a batch's global index is its position)."""
        b = self.edit_batch_size
        return [self.requests[i:i + b] for i in range(0, len(self.requests), b)]

    def rank_batch_ids(self) -> list[int]:
        """Global indices of the batches this rank applies."""
        ids = list(range(len(self.edit_batches())))
        return ids if self.shared_batches else share(ids, *self._world())

    def global_batch(self, batch_idx: int) -> int:
        """The global index of this rank's `batch_idx`-th batch."""
        return self.rank_batch_ids()[batch_idx]

    def rank_part(self, batch: list[EditRequest]) -> list[EditRequest]:
        """The records of `batch` this rank evaluates and reports (all of them unless the batch is shared)."""
        return share(batch, *self._world()) if self.shared_batches else list(batch)

    def rank_requests(self) -> list[EditRequest]:
        """Every record this rank evaluates and reports, in run order."""
        batches = self.edit_batches()
        return [r for i in self.rank_batch_ids() for r in self.rank_part(batches[i])]

    def test_dataloader(self) -> DataLoader:
        batches = self.edit_batches()
        return DataLoader([batches[i] for i in self.rank_batch_ids()], batch_size=None, collate_fn=_collate)

    # --- training ----------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rank, world = self._world()
        return DataLoader(self.train_requests, batch_size=self.train_batch_size * world, shuffle=True,
                          collate_fn=partial(_rank_slice, rank=rank, world=world), generator=_generator(self.seed),
                          drop_last=world > 1)  # every rank needs a full slice of every global batch

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_requests, batch_size=self.train_batch_size, shuffle=False, collate_fn=_collate)


def _generator(seed: int):
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    return g
