"""Offline shims for running EasyEdit's ROME / MEMIT beside ours (bench/vs_easyedit.py); EasyEdit is not vendored.

This file has two halves:

- `write_mom2_npz` / `mom2_npz_path` run in the bench's own process: they hand our key statistics C = E[kkᵀ]
  (kedit_pl/kv/stats.py, WikiText) to EasyEdit as the cache file its `layer_stats` looks for, in the format of
  its `runningstats.SecondMoment` state (an .npz with `mom2.mom2` = Σ kkᵀ, `mom2.count`, `mom2.constructor`,
  `sample_size`). EasyEdit then loads that file instead of downloading Wikipedia / WikiText and recomputing:
  both implementations edit with the same C. Only numpy is needed (a test covers it without EasyEdit).
- `run` (the command line, `python bench/easyedit_shims.py SPEC.json`) runs in EasyEdit's own environment (a
  separate virtualenv's python, never this repo's package): it imports EasyEdit's ROME or MEMIT, applies the
  shims below, edits the records one by one (ROME) or in one batch (MEMIT), times each call (wall and CPU
  seconds of the process), and saves the
  weight updates ΔW (edited weights minus the originals) so the bench scores them with our scorer. It imports
  nothing from kedit_pl.

What each shim changes (nothing in EasyEdit's algorithm):
1. Import: EasyEdit's top-level `easyeditor/__init__.py` and `easyeditor/models/__init__.py` import every editor
   and trainer (openai, sentence-transformers, peft, ...). The runner registers those two packages as empty
   namespace packages pointing at the same folders, so `easyeditor.models.rome` / `.memit` import alone, with
   their own code unchanged. The code comes from `--easyedit PATH` (a checkout) or else the installed package.
2. `datasets`: EasyEdit's layer_stats imports `datasets.load_dataset` at module level. Where `datasets` is not
   installed, a stub module stands in whose `load_dataset` raises; it is never called, because of shim 3.
3. Statistics: the C of our WikiText statistics is written where layer_stats looks for its cache (first half
   above), so EasyEdit neither downloads nor recomputes (`mom2_dataset` names that file only).
4. Model: loaded with `AutoModelForCausalLM.from_pretrained(folder)` from a local folder that the bench exports
   with our loader (no hub access); float32; `hparams.device = "cpu"`.
5. Tokenizer: pad = eos where there is none and right padding, as EasyEdit's `BaseEditor` sets up before it calls
   `apply_rome_to_model` (the runner calls that function directly, not through the editor).
6. Context templates: EasyEdit's module-level template cache (`CONTEXT_TEMPLATES_CACHE`) is set to our sampled
   templates, so both sides average keys and optimize over the same prefixes (EasyEdit would sample its own, with
   an unseeded sampler, on its first edit; template generation is a one-time cost that is not timed on either side).
7. The inverse statistics (ROME) / the covariance (MEMIT) are loaded before the first timed edit (one-time cost,
   as our `prepare()`), by calling EasyEdit's own `get_inv_cov` / `get_cov`.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: runningstats' class path as its state_dict writes it into `constructor`
SECOND_MOMENT_CONSTRUCTOR = "easyeditor.util.runningstats.SecondMoment()"


def mom2_npz_path(stats_dir: str | Path, model_name: str, ds_name: str, layer_name: str, precision: str,
                  sample_size: int | None) -> Path:
    """Where EasyEdit's `layer_stats` looks for the cached second moment of `layer_name` (its naming scheme:
    <stats_dir>/<model name>/<ds_name>_stats/<layer>_<precision>_mom2[_<sample_size>].npz)."""
    suffix = "" if sample_size is None else f"_{sample_size}"
    return Path(stats_dir) / model_name / f"{ds_name}_stats" / f"{layer_name}_{precision}_mom2{suffix}.npz"


def write_mom2_npz(path: str | Path, mom2: np.ndarray, count: int, sample_size: int) -> Path:
    """Write E[kkᵀ] (`mom2`, d×d, from `count` keys) as a SecondMoment cache file; atomic (temp file + rename).

    EasyEdit's `SecondMoment.moment()` returns `mom2.mom2 / mom2.count`, so the file holds the sum Σ kkᵀ =
    mom2 · count; `sample_size` must equal the hparams' `mom2_n_samples` (its cache check compares them)."""
    mom2 = np.asarray(mom2, dtype=np.float64)
    if mom2.ndim != 2 or mom2.shape[0] != mom2.shape[1]:
        raise ValueError(f"mom2: expected a square matrix, got shape {mom2.shape}")
    if int(count) < 1:
        raise ValueError(f"count: must be a positive number of keys, got {count}")
    if sample_size is None or int(sample_size) < 1:
        raise ValueError(f"sample_size: must be a positive number (the hparams' mom2_n_samples), got {sample_size}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"mom2.constructor": np.array(SECOND_MOMENT_CONSTRUCTOR), "mom2.count": np.array(int(count)),
             "mom2.mom2": mom2 * int(count), "sample_size": np.array(int(sample_size))}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **state)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_mom2_npz(path: str | Path) -> tuple[np.ndarray, int]:
    """(E[kkᵀ], count) back from a SecondMoment cache file (as EasyEdit's `moment()` computes it)."""
    with np.load(path, allow_pickle=False) as d:
        count = int(d["mom2.count"])
        return d["mom2.mom2"] / count, count


# --- the runner: EasyEdit's side (its own virtualenv) -----------------------------------------------------------

def easyedit_root(path: str | None) -> Path:
    """The folder that holds the `easyeditor` package: `path` (a checkout, or the package folder itself), else
    the installed package's parent, found without executing its __init__."""
    if path:
        p = Path(path).expanduser().resolve()
        root = p if (p / "easyeditor").is_dir() else p.parent if p.name == "easyeditor" else None
        if root is None or not (root / "easyeditor" / "models" / "rome").is_dir():
            raise SystemExit(f"--easyedit: {path} holds no easyeditor/models/rome (give an EasyEdit checkout)")
        return root
    import importlib.util
    spec = importlib.util.find_spec("easyeditor")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("easyeditor is not installed in this python; pass --easyedit PATH (an EasyEdit checkout)")
    return Path(next(iter(spec.submodule_search_locations))).parent


def install_import_shims(root: Path) -> None:
    """Shims 1 and 2: the `easyeditor` and `easyeditor.models` packages without their __init__, a `datasets` stub."""
    sys.path.insert(0, str(root))
    for name, sub in (("easyeditor", "easyeditor"), ("easyeditor.models", "easyeditor/models")):
        mod = types.ModuleType(name)
        mod.__path__ = [str(root / sub)]
        mod.__file__ = None
        sys.modules[name] = mod
        if "." in name:  # `import easyeditor.models.x as y` reads the attribute on the parent
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, mod)
    try:
        import datasets  # noqa: F401
    except ImportError:
        stub = types.ModuleType("datasets")

        def load_dataset(*args, **kwargs):
            raise RuntimeError("datasets stub (bench/easyedit_shims.py): statistics must come from the cache file "
                               "the bench writes; EasyEdit tried to load a dataset")
        stub.load_dataset = load_dataset
        sys.modules["datasets"] = stub


def _save_atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _ee_request(r: dict) -> dict:
    """EasyEdit's request dict: prompt with "{}", subject, target_new without the leading space (it adds one)."""
    return {"prompt": r["prompt"], "subject": r["subject"], "target_new": r["target_new"],
            "target_true": r["target_true"], "case_id": r["case_id"]}


def run(spec_path: str) -> None:
    """Edit the spec's records with EasyEdit; write result.json and deltas_<i>.pt (ΔW per edited weight)."""
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out_dir"])
    root = easyedit_root(spec.get("easyedit"))
    install_import_shims(root)
    import torch
    torch.set_num_threads(int(spec["threads"]))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    method = spec["method"]
    if method == "rome":
        from easyeditor.models.rome import rome_main as main_mod
        from easyeditor.models.rome.compute_u import get_inv_cov
        from easyeditor.models.rome.rome_hparams import ROMEHyperParams as HP
    elif method == "memit":
        from easyeditor.models.memit import memit_main as main_mod
        from easyeditor.models.memit.memit_hparams import MEMITHyperParams as HP
    else:
        raise SystemExit(f"method: 'rome' or 'memit', got {method!r}")
    hp = HP(**spec["hparams"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token is None:  # shim 5
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    t_load = time.perf_counter() - t0
    main_mod.CONTEXT_TEMPLATES_CACHE = spec["context_templates"]  # shim 6
    names = [hp.rewrite_module_tmp.format(layer) for layer in hp.layers]
    params = {n: dict(model.named_parameters())[f"{n}.weight"] for n in names}
    t0 = time.perf_counter()
    for n in names:  # shim 7: the statistics before the first timed edit
        if method == "rome":
            get_inv_cov(model, tok, n, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype, hparams=hp)
        else:
            main_mod.get_cov(model, tok, n, hp.mom2_dataset, hp.mom2_n_samples, hp.mom2_dtype, hparams=hp)
    t_stats = time.perf_counter() - t0
    requests = [_ee_request(r) for r in spec["requests"]]
    batches = [[r] for r in requests] if method == "rome" else [requests]
    result = {"easyedit_root": str(root), "load_seconds": t_load, "stats_seconds": t_stats, "edits": [],
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    for i, batch in enumerate(batches):
        before = {n: p.detach().clone() for n, p in params.items()}
        start, cpu = time.perf_counter(), time.process_time()
        if method == "rome":
            main_mod.apply_rome_to_model(model, tok, batch, hp, copy=False)
        else:
            main_mod.apply_memit_to_model(model, tok, batch, hp, copy=False)
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        deltas = {f"{n}.weight": (p.detach() - before[n]).clone() for n, p in params.items()}
        with torch.no_grad():  # restore: every record is edited on the unedited model
            for n, p in params.items():
                p.copy_(before[n])
        f = out / f"deltas_{i}.pt"
        torch.save(deltas, f.with_suffix(".tmp"))
        os.replace(f.with_suffix(".tmp"), f)
        result["edits"].append({"case_ids": [r["case_id"] for r in batch], "seconds": seconds, "cpu_seconds": cpu,
                               "deltas": f.name})
        print(f"[easyedit] {method} batch {i} ({len(batch)} edit(s)): {seconds:.2f}s", flush=True)
        _save_atomic_json(out / "result.json", result)  # after each edit: a killed run keeps what it did
    _save_atomic_json(out / "result.json", result)


def main(argv: Sequence[str] | None = None) -> None:
    """`python bench/easyedit_shims.py SPEC.json` (written by bench/vs_easyedit.py)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        raise SystemExit("usage: python bench/easyedit_shims.py SPEC.json")
    run(argv[0])


if __name__ == "__main__":
    main()
