"""Saved edits ("patches"): the weight changes of one edit, small, exact, and bound to the weights they were made on.

A patch is two files sharing a stem: `<stem>.safetensors` (the deltas) and `<stem>.json` (method, requests,
config, digests). Per changed parameter it stores either the low-rank factors the method wrote
(`EditHandle.low_rank`: ROME one rank-one term, MEMIT one rank-n term per layer, float64), replayed as
`param += (left @ right).to(param.dtype)` in the original order, or a dense float64 delta (FT, MEND). The few
elements where float rounding makes the replay (or its inverse) differ from the real weights are stored as
index/value fixups, so applying gives the edited weights bit-exactly and reverting the original ones.

Digests (SHA-256 of the exact bytes) bind a patch to weights: `before` of the changed parameters as they were,
`after` as the edit left them, `rest` a strided sample of every other parameter. Apply needs `before` + `rest`,
revert needs `after` + `rest`; anything else is refused with one line (a patch made for other weights, or
patches of a sequence applied out of order). `dtypes` records each changed parameter's dtype: weights held in
another dtype are refused by name. `meta`, the digest of the JSON's every other field (method, requests,
config, dtypes, ...), makes a hand-edited patch fail to load: what `list` shows is what was edited.
`format` is the version of these rules (2: the JSON is covered; 1, older: it was not, and is refused).

    python -m kedit_pl.patch list <patch or folder>...
    python -m kedit_pl.patch apply  --model smollm2_135m --out edited/ runs/x/patches/
    python -m kedit_pl.patch revert --model edited/ --out restored/ runs/x/patches/
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from kedit_pl.digests import tensor_digest, weights_digest  # the one tensor and weights digest (kedit_pl/digests.py)
from kedit_pl.errors import ConfigError, KEditError
from kedit_pl.io import json_digest, load_tensors, read_json, save_tensors, write_json
from kedit_pl.model_folder import EDITS_FILE, check_model_folder, request_dict, save_model  # noqa: F401 (re-exported)

FORMAT = 2
#: the formats of older versions, and why they are refused
OLD_FORMATS = {1: "its request metadata is not covered by a digest"}
#: replay fixups beyond this share of a parameter's elements mean the factors do not describe the update:
#: the parameter is stored dense instead
MAX_FIX_SHARE = 0.01


class PatchError(KEditError):
    """A patch that cannot be applied or reverted here (other weights, wrong order, damaged file)."""


@dataclass
class Patch:
    """One edit's weight changes. `tensors` is the safetensors content; `meta` the JSON."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def params(self) -> list[str]:
        """Names of the parameters this patch changes."""
        return list(self.meta["params"])

    def nbytes(self) -> int:
        """Bytes of tensor data the patch holds (factors and fixups)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ----------------------------------------------------------------------------- digests


def rest_digest(model: nn.Module, exclude: Iterable[str]) -> str:
    """A strided sample (≤ 65,536 elements each) of every parameter not in `exclude`: cheap, and any other model
    (or the same one carrying another edit elsewhere) gives a different digest."""
    return weights_digest(model, sample=65536, exclude=exclude)


def _touched(model: nn.Module, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise PatchError(f"the model has no parameter {missing[0]!r}; this patch was made for another architecture")
    return [(n, params[n]) for n in names]


# ----------------------------------------------------------------------------- making a patch


def make_patch(model: nn.Module, originals: dict[str, torch.Tensor],
               low_rank: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] | None = None,
               meta: dict[str, Any] | None = None) -> Patch:
    """The patch taking `originals` to the model's current values (call right after the edit)."""
    low_rank = low_rank or {}
    params = dict(model.named_parameters())
    changed = sorted(n for n, v in originals.items() if not torch.equal(params[n].detach().cpu(), v.cpu()))
    tensors: dict[str, torch.Tensor] = {}
    kinds: dict[str, dict[str, Any]] = {}
    for name in changed:
        old, new = originals[name].detach().cpu(), params[name].detach().cpu()
        entry = _encode(name, old, new, low_rank.get(name), tensors)
        kinds[name] = entry
    full = {**(meta or {})}
    full.update(format=FORMAT, params=changed, encoding=kinds,
                dtypes={n: str(originals[n].dtype).removeprefix("torch.") for n in changed},
                digests={"before": tensor_digest((n, originals[n]) for n in changed),
                         "after": tensor_digest((n, params[n]) for n in changed),
                         "rest": rest_digest(model, changed)})
    full = json.loads(json.dumps(full, default=str))  # as it reads back from the file (tuples -> lists, ...)
    full["digests"]["meta"] = meta_digest(full)
    return Patch(full, tensors)


def meta_digest(meta: dict[str, Any]) -> str:
    """Digest of a patch's JSON without its own `digests.meta` and the `file` it was read from."""
    rest = {k: v for k, v in meta.items() if k != "file"}
    rest["digests"] = {k: v for k, v in (meta.get("digests") or {}).items() if k != "meta"}
    return json_digest(rest)


def _encode(name: str, old: torch.Tensor, new: torch.Tensor, factors, tensors: dict[str, torch.Tensor]) -> dict:
    if factors:
        replay = _replay(old, factors, sign=1)
        if (replay != new).float().mean().item() <= MAX_FIX_SHARE:
            for i, (left, right) in enumerate(factors):
                tensors[f"{name}::left{i}"], tensors[f"{name}::right{i}"] = left.double(), right.double()
            entry = {"kind": "low_rank", "terms": len(factors), "rank": sum(int(l.shape[1]) for l, _ in factors)}
            _fixups(tensors, name, "apply", replay, new)
            _fixups(tensors, name, "revert", _replay(new, factors, sign=-1), old)
            return entry
    delta = new.double() - old.double()
    tensors[f"{name}::dense"] = delta
    _fixups(tensors, name, "apply", (old.double() + delta).to(old.dtype), new)
    _fixups(tensors, name, "revert", (new.double() - delta).to(old.dtype), old)
    return {"kind": "dense"}


def _replay(start: torch.Tensor, factors, sign: int) -> torch.Tensor:
    """`start` ± each low-rank term, in the order written (reversed when undoing), in the parameter's dtype."""
    out = start.clone()
    for left, right in (factors if sign > 0 else reversed(factors)):
        out.add_(sign * (left.double() @ right.double()).to(out.dtype))
    return out


def _fixups(tensors: dict[str, torch.Tensor], name: str, which: str, got: torch.Tensor, want: torch.Tensor) -> None:
    idx = (got.reshape(-1) != want.reshape(-1)).nonzero().flatten()
    if len(idx):
        tensors[f"{name}::{which}_idx"] = idx.to(torch.int32 if want.numel() < 2**31 else torch.int64)
        tensors[f"{name}::{which}_val"] = want.reshape(-1)[idx].clone()


# ----------------------------------------------------------------------------- applying / reverting


@torch.no_grad()
def apply_patch(model: nn.Module, patch: Patch) -> None:
    """Make the patch's edit on `model` (bit-exact), or refuse with a PatchError leaving the model as it was."""
    _change(model, patch, forward=True)


@torch.no_grad()
def revert_patch(model: nn.Module, patch: Patch) -> None:
    """Undo the patch's edit on `model` (bit-exact), or refuse with a PatchError leaving the model as it was."""
    _change(model, patch, forward=False)


def _change(model: nn.Module, patch: Patch, forward: bool) -> None:
    where = patch.meta.get("file", "patch")
    verb = "apply" if forward else "revert"
    if "memory" in patch.meta:  # kedit_pl/memory_patch.py
        raise PatchError(f"{where}: cannot {verb} to weights: a saved edit of memory method '{patch.meta.get('method')}' "
                         f"holds its memory, not weights; load it with Editor(method=...).apply_patch")
    names = patch.params
    touched = _touched(model, names)
    want, goal = ("before", "after") if forward else ("after", "before")
    for name, p in touched:
        made = patch.meta["dtypes"][name]
        if str(p.dtype).removeprefix("torch.") != made:
            raise PatchError(f"{where}: cannot {verb}: the patch was made on {made} weights and {name} is "
                             f"{str(p.dtype).removeprefix('torch.')} here; load the model in {made} "
                             f"(model.dtype={made})")
    if tensor_digest(touched) != patch.meta["digests"][want] or rest_digest(model, names) != patch.meta["digests"]["rest"]:
        state = "unedited" if forward else "edited"
        raise PatchError(f"{where}: cannot {verb}: the model's weights are not the {state} weights this patch was made "
                         f"for (digest mismatch; model '{patch.meta.get('model')}'"
                         f"{', sequence step ' + str(patch.meta['step']) if 'step' in patch.meta else ''}; "
                         "patches of a sequence apply in order and revert in reverse order)")
    saved = {n: p.detach().clone() for n, p in touched}
    try:
        for name, p in touched:
            p.copy_(_decode(patch, name, p.detach().cpu(), forward).to(p.device))
        if tensor_digest(touched) != patch.meta["digests"][goal]:
            raise PatchError(f"{where}: {verb} did not reproduce the recorded weights (damaged patch file?)")
    except BaseException:
        for name, p in touched:
            p.copy_(saved[name])
        raise


def _decode(patch: Patch, name: str, current: torch.Tensor, forward: bool) -> torch.Tensor:
    t, enc = patch.tensors, patch.meta["encoding"][name]
    try:
        if enc["kind"] == "low_rank":
            factors = [(t[f"{name}::left{i}"], t[f"{name}::right{i}"]) for i in range(enc["terms"])]
            out = _replay(current, factors, sign=1 if forward else -1)
        else:
            delta = t[f"{name}::dense"]
            out = (current.double() + delta if forward else current.double() - delta).to(current.dtype)
        which = "apply" if forward else "revert"
        if f"{name}::{which}_idx" in t:
            flat = out.reshape(-1)
            flat[t[f"{name}::{which}_idx"].long()] = t[f"{name}::{which}_val"].to(out.dtype)
    except (KeyError, RuntimeError, IndexError) as e:
        raise PatchError(f"{patch.meta.get('file', 'patch')}: entry for {name} is damaged ({e})") from None
    return out


# ----------------------------------------------------------------------------- files


def save_patch(patch: Patch, stem: str | Path) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` atomically; returns the json path."""
    stem = Path(stem)
    save_tensors(stem.with_suffix(".safetensors"), patch.tensors, metadata={"kedit_patch_format": str(FORMAT)})
    write_json(stem.with_suffix(".json"), patch.meta)
    return stem.with_suffix(".json")


def load_patch(path: str | Path) -> Patch:
    """Read a patch by either of its two files (or its stem)."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    js, st = stem.with_suffix(".json"), stem.with_suffix(".safetensors")
    if not js.is_file() or not st.is_file():
        raise PatchError(f"{stem}: a patch needs both {js.name} and {st.name}")
    try:
        meta = read_json(js)
        tensors = load_tensors(st)
    except Exception as e:  # damaged JSON or safetensors
        raise PatchError(f"{stem}: unreadable patch ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt in OLD_FORMATS:
        raise PatchError(f"{js}: patch format {fmt}, written by an older kedit_pl ({OLD_FORMATS[fmt]}); this version "
                         f"reads format {FORMAT}: make the edit again (edit.save=patch or AppliedEdit.save)")
    if fmt != FORMAT:
        raise PatchError(f"{js}: not a kedit_pl patch (format {fmt if fmt is not None else '?'})")
    if (meta.get("digests") or {}).get("meta") != meta_digest(meta):
        raise PatchError(f"{js}: its JSON was changed after the patch was made (it fails its digest digests.meta); "
                         f"the requests it lists may not be what it edits: remake the patch")
    meta["file"] = str(js)
    return Patch(meta, tensors)


def find_patches(paths: Iterable[str | Path]) -> list[Path]:
    """Patch json files: given files as they are, folders' patches sorted by name (the order they were made in)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.glob("*.json") if q.with_suffix(".safetensors").is_file())
            if not found:
                raise PatchError(f"{p}: no patches (pairs of .json and .safetensors) in this folder")
            out.extend(found)
        else:
            out.append(p)
    return out


def edit_meta(method: str, model: str, requests: list, config: dict | None = None, **extra: Any) -> dict[str, Any]:
    """The JSON side of a patch: what was edited, by which method and settings, on which model."""
    return {"method": method, "model": model, "requests": [request_dict(r) for r in requests],
            "config": config or {}, **extra}


# ----------------------------------------------------------------------------- CLI


def _load(model: str):
    from kedit_pl.config import compose
    from kedit_pl.models.load import load_model

    is_folder = Path(model).expanduser().is_dir()
    overrides = ["model=hf", f"model.path={model}"] if is_folder or "/" in model else [f"model={model}"]
    try:
        cfg = compose("edit", overrides + ["paths.output_dir=/tmp"])
    except Exception as e:  # hydra: unknown model name
        raise ConfigError(f"--model: {model!r} is neither a folder nor a model config in conf/model/ "
                          f"({str(e).splitlines()[0]})") from None
    return load_model(cfg.model)


def _list(paths: list[Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="patches")
    for col in ("file", "method", "model", "step", "requests", "parameters", "encoding", "KB"):
        table.add_column(col)
    for p in paths:
        patch = load_patch(p)
        m = patch.meta
        reqs = "; ".join(f"{r['prompt'].format(r['subject'])} → {r['target_new']}" for r in m.get("requests", []))
        enc = ", ".join(f"{e['kind']}" + (f" r{e['rank']}" if e["kind"] == "low_rank" else "")
                        for e in m["encoding"].values()) or ("memory" if "memory" in m else "")
        table.add_row(Path(p).stem, str(m.get("method")), str(m.get("model")), str(m.get("step", "")), reqs,
                      ", ".join(m["params"]), enc, f"{patch.nbytes() / 1024:.1f}")
    Console(width=None if sys.stdout.isatty() else 200).print(table)  # no wrapping into a pipe


def main(argv: list[str] | None = None) -> int:
    """`python -m kedit_pl.patch list|apply|revert PATCH...`; returns the exit status."""
    ap = argparse.ArgumentParser(prog="python -m kedit_pl.patch", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("list", help="show what each patch edits")
    ls.add_argument("patches", nargs="+")
    for cmd in ("apply", "revert"):
        sp = sub.add_parser(cmd, help=f"{cmd} patches (folders: all of their patches, in name order)")
        sp.add_argument("patches", nargs="+")
        sp.add_argument("--model", required=True, help="a conf/model name (smollm2_135m) or a saved model folder")
        sp.add_argument("--out", required=True, help="folder for the resulting Hugging Face model (new or empty)")
        sp.add_argument("--replace", action="store_true",
                        help="replace the model in --out, if kedit_pl wrote it (nothing else is ever deleted)")
    args = ap.parse_args(argv)
    try:
        paths = find_patches(args.patches)
        if args.cmd == "list":
            _list(paths)
            return 0
        patches = [load_patch(p) for p in paths]
        check_model_folder(args.out, args.replace)  # before loading: a refused --out costs nothing
        lm = _load(args.model)
        for patch in (patches if args.cmd == "apply" else reversed(patches)):
            (apply_patch if args.cmd == "apply" else revert_patch)(lm.model, patch)
        save_model(lm.model, lm.tokenizer, args.out, replace=args.replace)
        print(f"{args.cmd}: {len(patches)} patch(es) -> {args.out}")
    except KEditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
