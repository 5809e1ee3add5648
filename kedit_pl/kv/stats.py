"""Key statistics for ROME/MEMIT: the uncentred second moment C = E[k kᵀ] of the MLP output projection's input.

ROME (Meng et al. 2022, eq. 2) and MEMIT (eq. 14) both use C as the covariance of the keys already stored in
the layer. One pass over a plain-text corpus collects C for several layers at once and stops the forward right
after the highest requested layer's MLP output projection.

`n_samples` counts *token positions* (keys), not sequences: the corpus is tokenized once, cut into contiguous
chunks of `seq_len` tokens (a BOS is prepended per chunk when the tokenizer adds one; the BOS position itself is
not counted), and exactly `n_samples` positions are accumulated. Results are cached on disk (safetensors,
atomic) keyed by model, layer, corpus, count, seq_len and dtype; partial sums are checkpointed so an
interrupted run resumes where it stopped.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.config import missing_data
from kedit_pl.digests import model_fingerprint  # noqa: F401  (re-exported)
from kedit_pl.devices import model_device, place
from kedit_pl.errors import ConfigError
from kedit_pl.hooks import StopForward, capture, stop_after
from kedit_pl.io import cache_root, read_cache, save_cache
from kedit_pl.models.spec import ModelSpec
from kedit_pl.tokens import pad_id, prompt_ids, right_pad

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
log = logging.getLogger(__name__)


@dataclass
class StatsConfig:
    """The `stats` config group (conf/stats/*.yaml)."""

    corpus: str
    n_samples: int | None = 100_000  # token positions; None = the whole corpus
    seq_len: int = 256
    batch_size: int = 8
    dtype: str = "float64"  # accumulation dtype
    cache_dir: str | None = ".cache/kedit_pl/stats"  # None disables the disk cache (and resume)
    checkpoint_every: int = 20  # batches between partial-sum checkpoints
    progress: bool = True

    @classmethod
    def from_any(cls, cfg: "StatsConfig | Mapping[str, Any]") -> "StatsConfig":
        """Build from a config mapping or DictConfig (or pass one through)."""
        if isinstance(cfg, StatsConfig):
            return cfg
        try:  # DictConfig -> plain dict without importing omegaconf at module level
            from omegaconf import DictConfig, OmegaConf
            if isinstance(cfg, DictConfig):
                cfg = OmegaConf.to_container(cfg, resolve=True)
        except ImportError:
            pass
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ConfigError(f"stats config: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        if "corpus" not in cfg:
            raise ConfigError("stats config: 'corpus' (path to a plain-text file) is required")
        out = cls(**cfg)
        out.corpus = os.path.expanduser(os.path.expandvars(str(out.corpus)))
        if out.cache_dir:
            out.cache_dir = os.path.expanduser(os.path.expandvars(str(out.cache_dir)))
        if out.dtype not in _DTYPES:
            raise ConfigError(f"stats.dtype must be one of {list(_DTYPES)}, got {out.dtype!r}")
        if out.seq_len < 2 or out.batch_size < 1:
            raise ConfigError(f"stats: seq_len must be >= 2 and batch_size >= 1 (got {out.seq_len}, {out.batch_size})")
        if out.n_samples is not None and out.n_samples < 1:
            raise ConfigError(f"stats.n_samples must be positive or null (got {out.n_samples})")
        return out


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _special_prefix(tok: PreTrainedTokenizerBase) -> list[int]:
    """Special tokens the tokenizer prepends to a prompt (e.g. Gemma's BOS), [] if none."""
    with_sp, without = prompt_ids(tok, "a"), tok("a", add_special_tokens=False)["input_ids"]
    return with_sp[: len(with_sp) - len(without)] if with_sp[-len(without):] == without else []


def _corpus_tokens(tok: PreTrainedTokenizerBase, path: Path, need: int | None) -> list[int]:
    """Tokenize the corpus in ~64 KB blocks split at newlines until `need` tokens are available."""
    text = path.read_text(encoding="utf-8")
    ids: list[int] = []
    pos = 0
    while pos < len(text) and (need is None or len(ids) < need):
        end = text.find("\n", pos + (1 << 16))
        end = len(text) if end < 0 else end + 1
        ids.extend(tok(text[pos:end], add_special_tokens=False, verbose=False)["input_ids"])
        pos = end
    return ids


def _chunks(ids: list[int], prefix: list[int], seq_len: int, n: int | None) -> list[list[int]]:
    """Contiguous chunks of `seq_len` tokens (prefix included) holding exactly `n` counted positions."""
    body = seq_len - len(prefix)
    n = len(ids) if n is None else n
    if len(ids) < n:
        raise ConfigError(f"stats corpus has only {len(ids)} tokens but n_samples={n}; lower n_samples "
                          f"or set it to null to use the whole corpus")
    return [prefix + ids[i: min(i + body, n)] for i in range(0, n, body)]


def cache_key(spec: ModelSpec, fingerprint: str, layer: int, cfg: StatsConfig, tok: PreTrainedTokenizerBase) -> dict:
    """Everything the statistics of one layer depend on."""
    corpus = Path(cfg.corpus)
    return {"model": spec.name, "fingerprint": fingerprint, "module": spec.module_name("mlp_out", layer),
            "layer": layer, "corpus": str(corpus.resolve()), "corpus_bytes": corpus.stat().st_size,
            "corpus_sha": _file_digest(corpus), "n_samples": cfg.n_samples, "seq_len": cfg.seq_len,
            "dtype": cfg.dtype, "vocab": len(tok), "tokenizer": type(tok).__name__}


def _paths(cfg: StatsConfig, key: dict) -> tuple[Path, Path]:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    d = cache_root(cfg.cache_dir, "stats cache") / _safe(key["model"])
    stem = f"mom2_L{key['layer']}_{key['dtype']}_{key['n_samples']}_{digest}"
    return d / f"{stem}.safetensors", d / f"{stem}.partial.safetensors"


def _read_mom2(path: Path) -> torch.Tensor | None:
    """A cached E[kkᵀ], or None (a miss) if the file is absent, damaged, or not a second moment at all: every
    E[kkᵀ] is symmetric with a finite, non-negative diagonal (catches damage in files written without a digest)."""
    t = read_cache(path, "statistics cache")
    mom2 = None if t is None else t.get("mom2")
    if mom2 is None or mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        ok = False
    else:
        d = torch.diagonal(mom2)
        ok = bool(torch.isfinite(mom2).all() and (d >= 0).all() and torch.allclose(mom2, mom2.T, rtol=1e-5, atol=1e-8))
    if t is not None and not ok:
        log.warning("statistics cache: %s is damaged (not a symmetric second moment); recomputing and replacing it",
                    path)
        path.unlink(missing_ok=True)
    return mom2 if ok else None


def _batches(chunks: list[list[int]], start: int, size: int,
             pad: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    for c0 in range(start, len(chunks), size):
        ids, mask = right_pad(chunks[c0: c0 + size], pad)
        yield c0, ids, mask


@torch.no_grad()
def second_moment(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, layers: list[int],
                  cfg: StatsConfig | Mapping[str, Any], fingerprint: str | None = None) -> dict[int, torch.Tensor]:
    """E[k kᵀ] (d_k, d_k) in `cfg.dtype` for each layer's MLP output projection input; cached and resumable."""
    cfg = StatsConfig.from_any(cfg)
    layers = sorted(set(int(layer) for layer in layers))
    if not layers:
        return {}
    corpus = Path(cfg.corpus)
    if not corpus.is_file():
        raise ConfigError(missing_data("stats.corpus", corpus))
    dtype = _DTYPES[cfg.dtype]
    fingerprint = fingerprint or model_fingerprint(model)
    keys = {layer: cache_key(spec, fingerprint, layer, cfg, tok) for layer in layers}
    paths = {layer: _paths(cfg, keys[layer]) for layer in layers} if cfg.cache_dir else {}

    out: dict[int, torch.Tensor] = {}
    for layer in layers:
        if paths and (mom2 := _read_mom2(paths[layer][0])) is not None:
            out[layer] = mom2.to(dtype)
    todo = [layer for layer in layers if layer not in out]
    if todo:
        out.update(_accumulate(model, tok, spec, todo, cfg, dtype, keys, paths))
    # the methods' algebra runs where the model is; the CPU only if the statistics do not fit there (logged)
    return place({layer: out[layer] for layer in layers}, model_device(model), f"key statistics E[kkᵀ] {spec.name}")


def _accumulate(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, layers: list[int],
                cfg: StatsConfig, dtype: torch.dtype, keys: dict, paths: dict) -> dict[int, torch.Tensor]:
    """One forward pass per batch collects all `layers`; partial sums are checkpointed per layer."""
    prefix = _special_prefix(tok)
    need = cfg.n_samples
    chunks = _chunks(_corpus_tokens(tok, Path(cfg.corpus), need), prefix, cfg.seq_len, need)
    names = {layer: spec.module_name("mlp_out", layer) for layer in layers}
    sums: dict[int, torch.Tensor | None] = {layer: None for layer in layers}
    done = {layer: 0 for layer in layers}  # chunks already accumulated per layer
    for layer in layers:
        part = read_cache(paths[layer][1], "statistics checkpoint") if paths else None
        if part is not None:
            sums[layer], done[layer] = part["sum"].to(dtype), int(part["chunks_done"])

    def checkpoint() -> None:
        for layer in layers:
            if paths and sums[layer] is not None:
                save_cache(paths[layer][1], {"sum": sums[layer], "chunks_done": torch.tensor(done[layer])},
                             metadata={"key": json.dumps(keys[layer])})

    start = min(done.values())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    progress = _Bar(cfg.progress, len(chunks), start, f"E[kkᵀ] {spec.name} L{','.join(map(str, layers))}")
    try:
        with progress as bar, capture(model, list(names.values()), inputs=True, outputs=False) as cap, \
                stop_after(model, names[layers[-1]]):
            for i, (c0, ids, mask) in enumerate(_batches(chunks, start, cfg.batch_size, pad_id(tok))):
                ids, mask = ids.to(device), mask.to(device)
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except StopForward:
                    pass
                keep = mask.bool()
                keep[:, : len(prefix)] = False  # the BOS position is not a key we edit
                row_chunk = torch.arange(c0, c0 + ids.shape[0], device=device)
                for layer in layers:
                    rows = keep & (row_chunk >= done[layer]).unsqueeze(1)
                    k = cap.inputs[names[layer]][rows].to(dtype)
                    s = k.T @ k
                    sums[layer] = s if sums[layer] is None else sums[layer] + s
                    done[layer] = max(done[layer], c0 + ids.shape[0])
                bar(ids.shape[0])
                if cfg.checkpoint_every and (i + 1) % cfg.checkpoint_every == 0:
                    checkpoint()
    except BaseException:
        checkpoint()  # an interruption keeps what was done; the next run resumes from here
        raise
    finally:
        model.train(was_training)

    count = sum(len(c) - len(prefix) for c in chunks)
    result = {}
    for layer in layers:
        mom2 = sums[layer].cpu() / count
        result[layer] = mom2
        if paths:
            meta = {"key": json.dumps(keys[layer]), "count": str(count)}
            save_cache(paths[layer][0], {"mom2": mom2, "count": torch.tensor(count)}, metadata=meta)
            paths[layer][1].unlink(missing_ok=True)
    return result


class _Bar:
    """Context manager yielding `advance(n)`; a rich progress bar when enabled."""

    def __init__(self, enabled: bool, total: int, start: int, label: str) -> None:
        self.enabled, self.total, self.start, self.label = enabled, total, start, label

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("seqs"), TimeRemainingColumn())
        self.p.__enter__()
        task = self.p.add_task(self.label, total=self.total, completed=self.start)
        return lambda n: self.p.advance(task, n)

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False

