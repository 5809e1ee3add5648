"""Atomic, pickle-free file writing and reading: a crash never leaves a half-written file behind."""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from kedit_pl.digests import (DIGEST_VERSION, VERSION_KEY, file_version, json_digest,  # noqa: F401  (re-exported)
                              jsonable, tensor_digest)
from kedit_pl.errors import DamagedFile

log = logging.getLogger(__name__)

#: safetensors metadata field holding the digest of a cache file's tensors (see `save_cache`)
DIGEST_KEY = "kedit_tensor_digest"

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically: readers see the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def save_json_cache(path: str | os.PathLike, value: Any) -> None:
    """A JSON cache entry written atomically with the digest of its value, so `read_json_cache` detects damage."""
    write_json(path, {DIGEST_KEY: json_digest(value), "value": value})


def read_json_cache(path: str | os.PathLike, what: str) -> Any | None:
    """A JSON cache entry's value, or None for a miss: absent, unparsable, without a digest (written by an older
    version) or failing it. A damaged entry is named in a warning and removed, so the caller recomputes it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        entry = read_json(path)
        if not isinstance(entry, dict) or DIGEST_KEY not in entry or "value" not in entry:
            raise DamagedFile(f"{what}: {path} has no content digest (an older or foreign file)")
        if entry[DIGEST_KEY] != json_digest(entry["value"]):
            raise DamagedFile(f"{what}: {path} is damaged (its content does not match the digest stored in it)")
    except (DamagedFile, ValueError, OSError) as e:
        reason = e if isinstance(e, DamagedFile) else f"{what}: {path} is unreadable ({_first_line(e)})"
        log.warning("%s; treating it as a cache miss: recomputing and replacing it", reason)
        path.unlink(missing_ok=True)
        return None
    return entry["value"]


def read_jsonl(path: str | os.PathLike, what: str) -> list[Any]:
    """The lines of a JSON-lines file written as a run goes (absent: none). A torn line, as a killed run leaves
    at the end, is skipped with a warning naming the file and line, so a resume recomputes that entry."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            log.warning("%s: ignoring torn line %d of %s (it is recomputed)", what, i, path)
    return rows


def mend_torn_tail(path: str | os.PathLike, what: str) -> bool:
    """Before appending to a JSON-lines file: a last line without its newline (a run killed while writing it) is
    cut off, atomically, with a warning, so the next line does not land on the fragment. A last line that is
    whole JSON only gets its newline. True if the file was changed."""
    path = Path(path)
    if not path.is_file():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    keep = data.rfind(b"\n") + 1
    tail = data[keep:]
    try:
        json.loads(tail)
        fixed = data + b"\n"
    except ValueError:
        fixed = data[:keep]
        log.warning("%s: cutting the torn last line of %s (%d bytes, line %d; its record is recomputed)", what, path,
                    len(tail), data.count(b"\n") + 1)
    with atomic_path(path) as tmp:
        tmp.write_bytes(fixed)
    return True


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Safetensors (no pickle), written atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def load_tensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file into tensors on `device` (no digest check; see `read_cache`)."""
    return load_file(str(path), device=device)


def read_tensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a file that cannot be read raises one-line `DamagedFile`."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError, IndexError, KeyError, TypeError) as e:
        raise DamagedFile(f"{what}: {path} is damaged or not a safetensors file ({_first_line(e)})") from None


def load_torch_checkpoint(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A Lightning/torch checkpoint loaded without pickle (weights_only=True); garbage raises `DamagedFile`."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - random bytes reach the unpickler as IndexError, TypeError, ...
        # torch's message advises weights_only=False (running arbitrary pickled code); we never do that
        reason = ("damaged, or not a pickle-free torch checkpoint (holds objects other than tensors)"
                  if "weights_only" in str(e) else _first_line(e))
        raise DamagedFile(f"{what}: cannot read {path} ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict):
        raise DamagedFile(f"{what}: {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    return ckpt


def save_cache(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """A cache entry: `save_tensors` plus a digest of its tensors (and the digest version), so that `read_cache`
    detects any damage."""
    save_tensors(path, tensors, (metadata or {}) | digest_metadata(tensors))


def digest_metadata(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Safetensors metadata naming the digest of `tensors` and the digest version it was made with."""
    return {DIGEST_KEY: tensor_digest(tensors), VERSION_KEY: str(DIGEST_VERSION)}


def read_cache(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor] | None:
    """A cache entry's tensors, or None for a miss: absent, unreadable, failing its digest, or digested with
    another digest version. A damaged or outdated entry is named in a log line and removed, so the caller
    recomputes and replaces it (once). Entries written before digests existed are accepted unverified."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        tensors, meta = read_tensors(path, what)
        if DIGEST_KEY in meta and file_version(meta) != DIGEST_VERSION:
            log.warning("%s: %s was written with digest version %d, now %d (kedit_pl/digests.py); recomputing and "
                        "replacing it once", what, path, file_version(meta), DIGEST_VERSION)
            path.unlink(missing_ok=True)
            return None
        if DIGEST_KEY in meta and meta[DIGEST_KEY] != tensor_digest(tensors):
            raise DamagedFile(f"{what}: {path} is damaged (its tensors do not match the digest stored in it)")
    except DamagedFile as e:
        log.warning("%s; treating it as a cache miss: recomputing and replacing it", e)
        path.unlink(missing_ok=True)
        return None
    return tensors


#: the marker in a cache root naming the digest version its entries' keys were made with
CACHE_MARKER = "kedit_cache.json"


def cache_root(root: str | os.PathLike, what: str) -> Path:
    """`root` of a cache whose entries are keyed by weights digests, marked with the digest version. When the
    marker shows an older version (or an older cache has none), say once that its entries are rebuilt as needed
    (new keys never find the old entries) and update the marker."""
    root = Path(root)
    marker = root / CACHE_MARKER
    try:
        version = int(read_json(marker).get("digest_version", 0)) if marker.is_file() else None
    except (ValueError, OSError, AttributeError):
        version = 0
    if version == DIGEST_VERSION:
        return root
    if version is not None or (root.is_dir() and any(root.iterdir())):
        log.warning("%s: the entries in %s are keyed by digest version %s, now %d (kedit_pl/digests.py merged the "
                    "weights and tensor digests); they are rebuilt once, as they are needed, and the old ones are "
                    "never read again (delete them to free space)", what, root, version or 1, DIGEST_VERSION)
    write_json(marker, {"digest_version": DIGEST_VERSION})
    return root


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def folder_problem(path: str | Path) -> str | None:
    """Why `path` cannot be (or become) a folder: it, or a folder above it, is a file; None if it can."""
    path = Path(path).expanduser()
    for p in [path, *path.parents]:
        if p.exists():
            if p.is_dir():
                return None
            return f"{p} is a file, not a folder" if p == path else f"{p} (in {path}) is a file, not a folder"
    return None
