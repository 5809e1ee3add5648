"""Pre-edit scores on disk: every run of any method on the same model and records scores the unedited model once.

A record's pre scores depend on the unedited weights, the record's prompts and targets, the tokenizer and the
scoring settings (batch size, device, the scoring path), and on nothing else. The folder is keyed by a digest
of the weights' exact bytes and of the settings; each record is one JSON file named by a digest of its content,
so a changed weight, record or setting misses and a partly filled folder is reused for the records it holds.
Only plain-model logits (`ModelLogits`) are cached: a routing method's logits depend on more than the weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.scoring import LogitsFn, ModelLogits, score_requests
from kedit_pl.io import read_json, write_json
from kedit_pl.kv.value_cache import weights_digest

log = logging.getLogger(__name__)

#: bump when the numbers `score_requests` produces change, so old caches miss
SCORING_VERSION = 2


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()).hexdigest()[:24]


def tokenizer_digest(tok: PreTrainedTokenizerBase) -> str:
    """Digest of the vocabulary and special tokens (what turns prompt text into ids)."""
    return _digest([type(tok).__name__, sorted(tok.get_vocab().items()), tok.all_special_tokens,
                    getattr(tok, "add_bos_token", None)])


def record_digest(req: EditRequest) -> str:
    """Digest of everything in a record that scoring reads (not `extra`)."""
    return _digest({k: v for k, v in asdict(req).items() if k != "extra"})


def cache_folder(root: str | Path, fn: ModelLogits, tok: PreTrainedTokenizerBase, settings: dict[str, Any]) -> Path:
    """<root>/<weights digest>_<tokenizer + settings digest>."""
    key = _digest({"version": SCORING_VERSION, "tokenizer": tokenizer_digest(tok), "settings": settings,
                   "dtype": str(next(fn.model.parameters()).dtype)})
    return Path(root) / f"{weights_digest(fn.model)}_{key[:16]}"


def cached_pre_scores(root: str | Path | None, logits_fn: LogitsFn, tok: PreTrainedTokenizerBase,
                      requests: list[EditRequest], batch_size: int = 64, device: Any = "cpu",
                      score: Callable[..., list[dict]] = score_requests) -> list[dict]:
    """`score(logits_fn, tok, requests, batch_size, device)`, read from `root` where cached, the rest computed in
    one call and written (atomically, one file per record). `root=None` or a routing `logits_fn`: no cache."""
    if root is None or not isinstance(logits_fn, ModelLogits):
        return score(logits_fn, tok, requests, batch_size, device)
    folder = cache_folder(root, logits_fn, tok, {"batch_size": batch_size, "device": str(device)})
    files = [folder / f"{record_digest(r)}.json" for r in requests]
    out: list[dict | None] = [read_json(f) if f.exists() else None for f in files]
    missing = [i for i, rec in enumerate(out) if rec is None]
    log.info("pre-edit scores: %d of %d records cached in %s", len(requests) - len(missing), len(requests), folder)
    if missing:
        for i, rec in zip(missing, score(logits_fn, tok, [requests[i] for i in missing], batch_size, device)):
            write_json(files[i], rec)
            out[i] = rec
    return [rec | {"case_id": req.case_id} for rec, req in zip(out, requests)]
