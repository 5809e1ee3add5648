"""Pre-edit measurements on disk: every run of any method on the same model and records measures the unedited
model once.

A record's pre-edit ES/PS/NS scores, and its pre-edit metric-group measurements (fluency generations,
portability, ...), depend on the unedited weights, the record's content, the tokenizer and the settings of the
measurement, and on nothing else. A folder is keyed by a digest of the weights' exact bytes and of the kind and
settings of the measurement; each record is one JSON file named by a digest of its content and carrying a digest
of its value (`io.save_json_cache`), so a changed weight, record or setting misses, a partly filled folder is
reused for the records it holds, and a damaged file is named in a warning and recomputed, never used.
A model-state measurement (perplexity) is one file per folder. Only plain-model logits (`ModelLogits`) are
cached: a routing method's logits depend on more than the weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.scoring import LogitsFn, ModelLogits, score_requests
from kedit_pl.digests import weights_digest
from kedit_pl.io import cache_root, read_json_cache, save_json_cache

log = logging.getLogger(__name__)

#: bump when the numbers `score_requests` produces change, so old caches miss
SCORING_VERSION = 2
#: the file of a model-state measurement inside its folder
STATE_FILE = "state.json"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


def tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    """Digest of the vocabulary and special tokens (what turns prompt text into ids)."""
    return _digest([type(tok).__name__, sorted(tok.get_vocab().items()), tok.all_special_tokens,
                    getattr(tok, "add_bos_token", None)])


def record_digest(req: EditRequest) -> str:
    """Digest of everything in a record that scoring reads (not `extra`)."""
    return _digest({k: v for k, v in asdict(req).items() if k != "extra"})


class PreCache:
    """The pre-edit cache of one unedited model: `<root>/<weights digest>_<kind + settings digest>/`."""

    def __init__(self, root: str | Path, model: nn.Module, tok: PreTrainedTokenizerBase) -> None:
        self.root, self.model, self.tok = cache_root(root, "pre-score cache"), model, tok
        self.weights = weights_digest(model)  # once: hashing every weight costs ~0.5 s on a 135M model
        self.tok_digest = tokenizer_digest(tok)

    def folder(self, settings: dict[str, Any]) -> Path:
        """The cache folder for one kind of measurement: the weights digest and a digest of the settings, tokenizer
        and dtype."""
        key = _digest({"version": SCORING_VERSION, "tokenizer": self.tok_digest, "settings": settings,
                       "dtype": str(next(self.model.parameters()).dtype)})
        return self.root / f"{self.weights}_{key[:16]}"

    def per_record(self, settings: dict[str, Any], requests: list[EditRequest],
                   compute: Callable[[list[EditRequest]], list[dict]], what: str = "pre-edit scores") -> list[dict]:
        """`compute(requests)`, read from the cache where held; the rest computed in one call and written."""
        folder = self.folder(settings)
        files = [folder / f"{record_digest(r)}.json" for r in requests]
        out: list[dict | None] = [read_json_cache(f, what) for f in files]
        missing = [i for i, rec in enumerate(out) if rec is None]
        log.info("%s: %d of %d records cached in %s", what, len(requests) - len(missing), len(requests), folder)
        if missing:
            for i, rec in zip(missing, compute([requests[i] for i in missing])):
                save_json_cache(files[i], rec)
                out[i] = rec
        return out  # type: ignore[return-value]

    def state(self, settings: dict[str, Any], compute: Callable[[], dict], what: str) -> dict:
        """A measurement of the unedited model as a whole (one value per folder)."""
        path = self.folder(settings) / STATE_FILE
        value = read_json_cache(path, what)
        if value is None:
            value = compute()
            save_json_cache(path, value)
        return value


def pre_cache_for(root: str | Path | None, logits_fn: LogitsFn, tok: PreTrainedTokenizerBase) -> PreCache | None:
    """The cache for `logits_fn`'s model, or None: caching off (`root=None`) or a routing `logits_fn`."""
    if root is None or not isinstance(logits_fn, ModelLogits):
        return None
    return PreCache(root, logits_fn.model, tok)


def cached_pre_scores(root: str | Path | PreCache | None, logits_fn: LogitsFn, tok: PreTrainedTokenizerBase,
                      requests: list[EditRequest], batch_size: int = 64, device: Any = "cpu",
                      score: Callable[..., list[dict]] = score_requests) -> list[dict]:
    """`score(logits_fn, tok, requests, batch_size, device)`, read from the cache where held (see the module
    docstring); `root=None` or a routing `logits_fn`: no cache."""
    cache = root if isinstance(root, PreCache) else pre_cache_for(root, logits_fn, tok)
    if cache is None:
        return score(logits_fn, tok, requests, batch_size, device)
    recs = cache.per_record({"batch_size": batch_size, "device": str(device)}, requests,
                            lambda reqs: score(logits_fn, tok, reqs, batch_size, device))
    return [rec | {"case_id": req.case_id} for rec, req in zip(recs, requests)]
