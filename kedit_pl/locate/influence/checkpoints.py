"""Which weights influence methods look at, and the teaching run's checkpoints of them.

A checkpoint holds only the trained weights (safetensors + digest, `kedit_pl/io.py`), with metadata naming the
model, the corpus digest, the learning rate and the step, so TracIn can weight each checkpoint by its learning
rate (Pruthi et al. 2020, TracInCP) and refuse a checkpoint of another model or another corpus.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from kedit_pl.errors import ConfigError, DamagedFile
from kedit_pl.digests import file_version, tensor_digest, tensor_digest_matches
from kedit_pl.io import DIGEST_KEY, read_tensors, save_cache
from kedit_pl.models.spec import ModelSpec

META_KEY = "kedit_influence_checkpoint"


def default_layers(spec: ModelSpec) -> list[int]:
    """The layers causal tracing marks for the model (its MEMIT range, else its ROME layer) plus the last two."""
    md = spec.method_defaults or {}
    marked = list((md.get("memit") or {}).get("layers") or [])
    if not marked and (md.get("rome") or {}).get("layer") is not None:
        marked = [int(md["rome"]["layer"])]
    return sorted({*map(int, marked), spec.n_layers - 2, spec.n_layers - 1} - {-1})


def weight_names(spec: ModelSpec, layers: Sequence[int] | None, modules: Sequence[str] = ("mlp_out",)) -> list[str]:
    """Parameter names of the chosen projections (`layers` None: `default_layers`)."""
    layers = default_layers(spec) if layers is None else list(layers)
    if not layers or not modules:
        raise ConfigError(f"influence parameters: need at least one layer and module, got layers={layers}, "
                          f"modules={list(modules)}")
    return [spec.weight_name(m, int(layer)) for layer in layers for m in modules]


@dataclass
class Checkpoint:
    """The traced parameters of one teaching checkpoint, with its learning rate, step and digest."""
    path: Path
    tensors: dict[str, torch.Tensor]
    lr: float
    step: int
    digest: str


def save_checkpoint(path: str | Path, model: nn.Module, names: Sequence[str], *, model_name: str, corpus: str,
                    lr: float, step: int, epoch: int) -> None:
    """Save the named parameters and the checkpoint's metadata as a verified cache file."""
    params = dict(model.named_parameters())
    tensors = {n: params[n].detach().clone() for n in names}
    meta = {"model": model_name, "corpus": corpus, "lr": lr, "step": step, "epoch": epoch}
    save_cache(path, tensors, {META_KEY: json.dumps(meta)})


def checkpoint_files(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """A folder (its *.safetensors, by step) or a list of files."""
    if isinstance(spec, (str, Path)):
        p = Path(spec)
        if p.is_dir():
            files = sorted(p.glob("*.safetensors"), key=_step_of)
            if not files:
                raise ConfigError(f"locate.checkpoints: no *.safetensors checkpoints in {p}")
            return files
        return [p]
    return [Path(x) for x in spec]


def _step_of(path: Path) -> int:
    try:
        return int(path.stem.rsplit("_", 1)[-1])
    except ValueError:
        return 0


def load_checkpoints(files: Sequence[Path], model: nn.Module, model_name: str, corpus: str | None) -> list[Checkpoint]:
    """Read and check every checkpoint against the model (names, shapes, model name) and the corpus digest."""
    params = dict(model.named_parameters())
    out: list[Checkpoint] = []
    first_corpus: str | None = None  # every checkpoint of the list: the same weights, the same corpus
    for i, path in enumerate(files):
        where = f"locate.checkpoints[{i}]"
        if not path.is_file():
            raise ConfigError(f"{where}: file not found: {path}")
        tensors, meta = read_tensors(path, where)
        if DIGEST_KEY in meta and not tensor_digest_matches(tensors, meta[DIGEST_KEY], file_version(meta)):
            raise DamagedFile(f"{where}: {path} is damaged (its tensors do not match their stored digest)")
        info = json.loads(meta.get(META_KEY, "{}") or "{}")
        if info.get("model") not in (None, model_name):
            raise ConfigError(f"{where}: {path.name} was trained from model {info['model']!r}, this run loads "
                              f"{model_name!r}")
        for name, t in tensors.items():
            if name not in params:
                raise ConfigError(f"{where}: {path.name} holds {name!r}, which model {model_name!r} does not have")
            if tuple(t.shape) != tuple(params[name].shape):
                raise ConfigError(f"{where}: {path.name} has {name} of shape {tuple(t.shape)}, model {model_name!r} "
                                  f"has {tuple(params[name].shape)}")
        if corpus is not None and info.get("corpus") not in (None, corpus):
            raise ConfigError(f"{where}: {path.name} was trained on corpus {info['corpus']}, this run builds corpus "
                              f"{corpus} (same ftrace.* settings as the teaching run?)")
        if not out:
            first_corpus = info.get("corpus")
        elif set(tensors) != set(out[0].tensors):
            raise ConfigError(f"{where}: {path.name} holds weights {sorted(tensors)}, locate.checkpoints[0] "
                              f"({out[0].path.name}) holds {sorted(out[0].tensors)}; a checkpoint list comes from "
                              f"one teaching run")
        elif info.get("corpus") != first_corpus:
            raise ConfigError(f"{where}: {path.name} was trained on corpus {info.get('corpus')}, "
                              f"locate.checkpoints[0] on corpus {first_corpus}; a checkpoint list comes from one "
                              f"teaching run")
        out.append(Checkpoint(path, tensors, float(info.get("lr", 1.0)), int(info.get("step", i)),
                              meta.get(DIGEST_KEY) or tensor_digest(tensors)))
    return out


@contextmanager
def applied(model: nn.Module, ckpt: Checkpoint | None) -> Iterator[None]:
    """The model with the checkpoint's weights in place; the original weights are restored exactly after."""
    if ckpt is None:
        yield
        return
    params = dict(model.named_parameters())
    saved = {n: params[n].detach().clone() for n in ckpt.tensors}
    try:
        with torch.no_grad():
            for n, t in ckpt.tensors.items():
                params[n].copy_(t)
        yield
    finally:
        with torch.no_grad():
            for n, t in saved.items():
                params[n].copy_(t)
