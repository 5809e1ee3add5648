"""Ours against EasyEdit's ROME / MEMIT, side by side, on the same records with the same hyperparameters.

    python bench/vs_easyedit.py --easyedit PATH [--python PY] [--method rome|memit] [--n 5] [--split test]
                                [--start 0] [--layer L] [--threads 1] [--compute-dtype bfloat16] [--reuse]

EasyEdit is never vendored into this repo: `--easyedit PATH` is an EasyEdit checkout (the folder holding
`easyeditor/`); without it the `easyeditor` package installed in `--python` is used. `--python` is the
interpreter of EasyEdit's own environment (a separate virtualenv, e.g. `python -m venv --system-site-packages
/work/ee_venv && /work/ee_venv/bin/pip install datasets`, so this environment's torch / transformers stay as
they are); it defaults to $EASYEDIT_PYTHON, else this interpreter. The published PyPI package (`easyeditor`
0.0.1.dev0, 2023) installs but hard-codes `cuda:` devices in ROME and MEMIT, so on a CPU machine a checkout
of a later EasyEdit (whose devices come from `hparams.device`) is what runs.

What runs, one after the other, each with `--threads` torch threads (1 by default):
1. Ours: the model from our loader (`model=smollm2_135m`), the method from our config (`method=rome|memit`,
   its defaults: layer, steps, learning rate, clamp, KL factor, statistics), its one-time costs (statistics,
   context templates, bf16 copies) done before the timed edits. ROME: each record edited alone (edit, keep ΔW,
   restore); MEMIT: all records in one batch (`method.z_cache=false`: every z computed).
2. EasyEdit, in a subprocess with `--python` (bench/easyedit_shims.py), on the same records: ROME's
   `apply_rome_to_model` per record, MEMIT's `apply_memit_to_model` on the whole batch, each timed; it returns
   the ΔW of the edited weights. Its hyperparameters are ours, mapped field by field (`ee_hparams`).
3. Scoring: both sets of ΔW are written in turn into the same model here and scored by our scorer
   (`eval/scoring.py`, ES / PS / NS as in `eval/metrics.py`), so the metric is the same for both; the unedited
   model is scored once for reference.
Prints per record (ROME) the seconds per edit of both (wall, and CPU seconds of each process: on a shared machine
the CPU seconds move much less with the load than the wall seconds), their ratios, ES / PS / NS and the cosine
between the two ΔW; then the medians, the ratios, and ES / PS / NS / Score of both. A JSON of everything goes to
`<work>/<method>/summary.json`.

Offline shims (all in bench/easyedit_shims.py, which says what each changes; EasyEdit's algorithm is untouched):
- the model is exported once with our loader (`save_pretrained` of model and tokenizer) into
  `<paths.cache_dir>/easyedit_export/<model>_<weights digest>`, and EasyEdit loads it from there (no hub);
- EasyEdit's covariance statistics are ours: C = E[kkᵀ] of our WikiText corpus (`stats.*`), written as the
  `SecondMoment` cache file its `layer_stats` reads, so it neither downloads nor recomputes them; its
  `mom2_n_samples` is set to our `stats.n_samples` only to name that file (we count token positions, EasyEdit
  counts texts: it would have drawn another sample);
- its context templates are set to ours (same prefixes on both sides);
- its package `__init__`s, which import every editor and their dependencies, are skipped; `datasets` is stubbed
  where it is not installed (never called);
- its tokenizer set-up (pad = eos, right padding) is done by the runner, as EasyEdit's `BaseEditor` does.
Not matched, because the two codes differ there (said in the output): EasyEdit computes the rank-one update in
float32 and inverts C with `torch.inverse`; ours solves in float64 with a Cholesky factor. Our value loop
recomputes only the layers above the edit layer, with bf16 projections (`method.compute_dtype`,
`--compute-dtype float32` for the exact path); EasyEdit runs the whole model in float32 every step.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
import easyedit_shims as shims  # bench/easyedit_shims.py: the statistics file format and the runner

from kedit_pl.config import compose
from kedit_pl.data.datamodule import load_split, select
from kedit_pl.data.splits import apply_split
from kedit_pl.eval import scoring
from kedit_pl.eval.metrics import record_metrics, summarize
from kedit_pl.io import write_json
from kedit_pl.kv.context import template_groups
from kedit_pl.kv.stats import second_moment
from kedit_pl.methods.memit import MEMIT
from kedit_pl.methods.rome import ROME
from kedit_pl.models.load import load_model
from kedit_pl.pipeline import build_method

RUNNER = Path(__file__).resolve().parent / "easyedit_shims.py"
STATS_DS_NAME = "kedit_wikitext"  # EasyEdit's mom2_dataset: only names the statistics file the bench writes


def export_model(lm, root: Path, fingerprint: str) -> Path:
    """Our loaded model and tokenizer as a local HF folder (save_pretrained), once per weights digest."""
    folder = root / f"{lm.spec.name}_{fingerprint[:12]}"
    done = folder / "kedit_export.json"
    if not done.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        write_json(done, {"model": lm.spec.name, "fingerprint": fingerprint})  # last: marks a complete export
    return folder


def module_templates(spec) -> dict[str, str]:
    """EasyEdit's module-name templates from our ModelSpec. With tied embeddings the LM head's weight is listed
    under the embedding only (named_parameters drops the duplicate), and EasyEdit's MEMIT reads it by name."""
    return {"rewrite_module_tmp": spec.mlp_out, "layer_module_tmp": spec.layer, "mlp_module_tmp": spec.mlp,
            "attn_module_tmp": spec.attn, "ln_f_module": spec.final_norm,
            "lm_head_module": spec.embed if spec.tied_embeddings else spec.lm_head}


def ee_hparams(method: ROME, model_dir: Path, stats_dir: Path) -> dict[str, Any]:
    """EasyEdit's ROMEHyperParams / MEMITHyperParams fields with our method's values."""
    hp, spec = method.hp, method.spec
    common = dict(fact_token="subject_last", v_num_grad_steps=hp["steps"], v_lr=hp["lr"],
                  v_loss_layer=method.loss_layer if method.loss_layer is not None else spec.n_layers - 1,
                  v_weight_decay=hp["weight_decay"], clamp_norm_factor=hp["clamp_norm_factor"],
                  kl_factor=hp["kl_factor"], mom2_adjustment=method.mom2_adjustment, **module_templates(spec),
                  mom2_dataset=STATS_DS_NAME, mom2_n_samples=method.stats.n_samples, mom2_dtype=method.stats.dtype,
                  device="cpu", model_name=str(model_dir), stats_dir=str(stats_dir))
    if isinstance(method, MEMIT):
        return dict(common, alg_name="MEMIT", layers=list(method.layers), layer_selection="all",
                    mom2_update_weight=method.mom2_update_weight)
    return dict(common, alg_name="ROME", layers=[method.layer],
                context_template_length_params=[list(p) for p in method.lengths])


def check_matchable(method: ROME) -> None:
    """Settings of ours that EasyEdit has no field for must be at the values its code hard-codes."""
    bad = []
    if method.hp["stop_loss"] != 0.05:
        bad.append(f"stop_loss={method.hp['stop_loss']} (EasyEdit: 0.05)")
    if isinstance(method, MEMIT):
        if method.key_groups is None:
            bad.append("key_average=uniform (EasyEdit: the mean of the group means, key_average=groups)")
    else:
        if method.constraint_key != "plain" or method.mom2_update_weight != 0.0:
            bad.append("constraint_key must be plain and mom2_update_weight 0 (EasyEdit's ROME)")
    if not method.mom2_adjustment:
        bad.append("mom2_adjustment=false")  # allowed by EasyEdit, but then no statistics are compared
    if bad:
        raise SystemExit("vs_easyedit: settings EasyEdit cannot match: " + "; ".join(bad))


def write_stats(method: ROME, layers: list[int], stats_dir: Path, model_name: str) -> list[Path]:
    """Our C at `layers` as EasyEdit's SecondMoment cache files (shim 3 of easyedit_shims.py)."""
    if method.stats.n_samples is None:
        raise SystemExit("vs_easyedit: stats.n_samples must be a number (EasyEdit names its file by it)")
    mom2 = second_moment(method.model, method.tok, method.spec, layers, method.stats, method.fingerprint)
    return [shims.write_mom2_npz(shims.mom2_npz_path(stats_dir, model_name, STATS_DS_NAME,
                                                     method.spec.module_name("mlp_out", layer),
                                                     method.stats.dtype, method.stats.n_samples),
                                 mom2[layer].double().cpu().numpy(), method.stats.n_samples, method.stats.n_samples)
            for layer in layers]


def ee_templates(method: ROME) -> list:
    """Our context templates in EasyEdit's shape: ROME a flat list, MEMIT a list of groups ([["{}"], [...]])."""
    flat = method.templates()
    if not isinstance(method, MEMIT):
        return flat
    out, i = [], 0
    for size in template_groups(method.lengths):
        out.append(flat[i: i + size])
        i += size
    return out


def request_dict(req) -> dict[str, str]:
    return {"case_id": req.case_id, "prompt": req.prompt, "subject": req.subject, "target_new": req.target_new,
            "target_true": req.target_true}


def run_easyedit(args, spec: dict, out: Path, console: Console) -> dict:
    """Run the EasyEdit runner in its own interpreter; reuse a finished result for the same spec on --reuse."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    result_file, spec_file = out / "result.json", out / "spec.json"
    if args.reuse and result_file.is_file() and spec_file.is_file() and \
            json.loads(spec_file.read_text()).get("digest") == digest:
        res = json.loads(result_file.read_text())
        if len(res["edits"]) == (len(spec["requests"]) if spec["method"] == "rome" else 1) and \
                all("cpu_seconds" in e for e in res["edits"]):
            console.print(f"EasyEdit: reusing {result_file} (same spec)")
            return res
    for f in out.glob("deltas_*.pt"):
        f.unlink()
    result_file.unlink(missing_ok=True)
    write_json(spec_file, dict(spec, digest=digest))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    log = out / "easyedit.log"
    console.print(f"EasyEdit: {args.python} {RUNNER.name} (log: {log})")
    with log.open("w") as fh:
        rc = subprocess.run([args.python, str(RUNNER), str(spec_file)], stdout=fh, stderr=subprocess.STDOUT,
                            env=env, check=False).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"vs_easyedit: the EasyEdit runner failed (exit {rc}); last lines of {log}:\n"
                         + "\n".join(tail))
    return json.loads(result_file.read_text())


def score(lm, requests, batch_size: int) -> list[dict]:
    """Per-record scores of the model as it is now (our scorer)."""
    device = next(lm.model.parameters()).device
    return scoring.score_requests(scoring.model_logits(lm.model), lm.tokenizer, requests, batch_size, device)


@torch.no_grad()
def with_deltas(lm, deltas: dict[str, torch.Tensor], fn):
    """Run `fn()` with ΔW added to the named weights, then put the exact original bits back."""
    params = dict(lm.model.named_parameters())
    saved = {n: params[n].detach().clone() for n in deltas}
    try:
        for n, d in deltas.items():
            params[n].add_(d.to(params[n].dtype))
        return fn()
    finally:
        for n, w in saved.items():
            params[n].copy_(w)


def cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[n].flatten().double() for n in sorted(a)])
    y = torch.cat([b[n].flatten().double() for n in sorted(a)])
    return (x @ y / (x.norm() * y.norm()).clamp_min(1e-300)).item()


def fmt_metrics(m: dict[str, float]) -> str:
    return " / ".join(f"{m[k]:.1f}" for k in ("es", "ps", "ns") if k in m)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--easyedit", default=None, help="EasyEdit checkout (folder holding easyeditor/)")
    ap.add_argument("--python", default=os.environ.get("EASYEDIT_PYTHON", sys.executable),
                    help="EasyEdit's interpreter (its virtualenv's python)")
    ap.add_argument("--method", default="rome", choices=("rome", "memit"))
    ap.add_argument("--model", default="smollm2_135m")
    ap.add_argument("--n", type=int, default=5, help="records (MEMIT: edits in the batch)")
    ap.add_argument("--split", default="test", help="dataset.split (dev | test | all)")
    ap.add_argument("--start", type=int, default=0, help="first record's position within the split")
    ap.add_argument("--layer", type=int, default=None, help="ROME edit layer (default: the model's)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on each side")
    ap.add_argument("--compute-dtype", default=None, help="our method.compute_dtype (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=64, help="scoring batch size")
    ap.add_argument("--work", default="/tmp/kedit_vs_easyedit", help="EasyEdit's statistics, ΔW, logs, summary")
    ap.add_argument("--reuse", action="store_true", help="reuse a finished EasyEdit run of the same spec")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    load0 = os.getloadavg()

    overrides = [f"model={args.model}", f"method={args.method}", "paths.output_dir=/tmp/kedit_vs_easyedit_run",
                 f"dataset.split={args.split}"]
    if args.layer is not None and args.method == "rome":
        overrides.append(f"method.layer={args.layer}")
    if args.compute_dtype:
        overrides.append(f"method.compute_dtype={args.compute_dtype}")
    if args.method == "memit":
        overrides.append("method.z_cache=false")
    cfg = compose("edit", overrides)
    lm = load_model(cfg.model)
    in_split = apply_split(load_split(cfg.dataset.path, cfg.dataset.format), args.split, cfg.dataset.get("split_rule"))
    requests = select(in_split, range_=f"{args.start}:{args.start + args.n}")
    method = build_method(cfg, lm)
    assert isinstance(method, ROME)
    check_matchable(method)
    t0 = time.perf_counter()
    method.prepare()
    t_prep = time.perf_counter() - t0
    layers = list(method.layers) if isinstance(method, MEMIT) else [method.layer]
    names = [lm.spec.weight_name("mlp_out", layer) for layer in layers]
    dtype = method.hp.get("compute_dtype", "float32")
    console.print(f"{args.model} {args.method} layer(s) {layers}, {len(requests)} {args.split} records "
                  f"(case_ids {requests[0].case_id}..{requests[-1].case_id}), {args.threads} thread(s); ours: fast, "
                  f"compute_dtype={dtype}; one-time costs {t_prep:.1f}s; load average at start {load0[0]:.2f}")

    # --- ours ---------------------------------------------------------------------------------------------
    params = dict(lm.model.named_parameters())
    batches = [[r] for r in requests] if args.method == "rome" else [requests]
    ours: list[dict] = []
    for batch in batches:
        before = {n: params[n].detach().clone() for n in names}
        t0, c0 = time.perf_counter(), time.process_time()
        handle = method.apply(batch)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        deltas = {n: (params[n].detach() - before[n]).clone() for n in names}
        recs = score(lm, batch, args.batch_size)
        method.restore(handle)
        steps = [p["steps"] + 1 for p in handle.info.get("per_request", []) if "steps" in p]  # forwards, as EasyEdit's
        ours.append({"case_ids": [r.case_id for r in batch], "seconds": seconds, "cpu_seconds": cpu, "deltas": deltas,
                     "scores": recs, "steps": steps})
        console.print(f"ours: {len(batch)} edit(s) in {seconds:.2f}s ({cpu:.2f} CPU s), value-loop forwards {steps}")

    # --- EasyEdit -------------------------------------------------------------------------------------------
    work = Path(args.work).expanduser()
    out = work / args.method
    out.mkdir(parents=True, exist_ok=True)
    model_dir = export_model(lm, Path(cfg.paths.cache_dir).expanduser() / "easyedit_export", method.fingerprint)
    stats_dir = work / "stats"
    write_stats(method, layers, stats_dir, model_dir.name)
    spec = {"method": args.method, "easyedit": args.easyedit, "model_dir": str(model_dir),
            "hparams": ee_hparams(method, model_dir, stats_dir), "context_templates": ee_templates(method),
            "requests": [request_dict(r) for r in requests], "threads": args.threads, "out_dir": str(out)}
    ee = run_easyedit(args, spec, out, console)
    by_case = {r.case_id: r for r in requests}
    theirs: list[dict] = []
    for e in ee["edits"]:
        deltas = torch.load(out / e["deltas"])
        batch = [by_case[c] for c in e["case_ids"]]
        recs = with_deltas(lm, deltas, lambda b=batch: score(lm, b, args.batch_size))
        theirs.append({"case_ids": e["case_ids"], "seconds": e["seconds"], "cpu_seconds": e.get("cpu_seconds"),
                       "deltas": deltas, "scores": recs})
    unedited = score(lm, requests, args.batch_size)
    load1 = os.getloadavg()

    # --- report ---------------------------------------------------------------------------------------------
    per_edit = lambda runs, key="seconds": [r[key] / len(r["case_ids"]) for r in runs]
    s_ours, s_ee = statistics.median(per_edit(ours)), statistics.median(per_edit(theirs))
    c_ours, c_ee = statistics.median(per_edit(ours, "cpu_seconds")), statistics.median(per_edit(theirs, "cpu_seconds"))
    m_ours = summarize([x for r in ours for x in r["scores"]])
    m_ee = summarize([x for r in theirs for x in r["scores"]])
    m_pre = summarize(unedited)
    table = Table(title=f"{args.method.upper()}: ours vs EasyEdit ({Path(ee['easyedit_root']).name}), {args.model}, "
                        f"{args.threads} thread(s) each, one after the other")
    for col in ("case_id(s)", "ours s/edit", "EasyEdit s/edit", "EasyEdit / ours", "CPU s/edit ours | EasyEdit",
                "CPU ratio", "ours ES/PS/NS", "EasyEdit ES/PS/NS", "cos ΔW"):
        table.add_column(col)
    for a, b in zip(ours, theirs):
        ids = a["case_ids"][0] if len(a["case_ids"]) == 1 else f"{len(a['case_ids'])} edits"
        ma = summarize(a["scores"]) if len(a["scores"]) > 1 else {k: 100 * v for k, v in record_metrics(a["scores"][0]).items()}
        mb = summarize(b["scores"]) if len(b["scores"]) > 1 else {k: 100 * v for k, v in record_metrics(b["scores"][0]).items()}
        sa, sb = a["seconds"] / len(a["case_ids"]), b["seconds"] / len(b["case_ids"])
        ca, cb = a["cpu_seconds"] / len(a["case_ids"]), b["cpu_seconds"] / len(b["case_ids"])
        table.add_row(str(ids), f"{sa:.2f}", f"{sb:.2f}", f"{sb / sa:.2f}x", f"{ca:.2f} | {cb:.2f}", f"{cb / ca:.2f}x",
                      fmt_metrics(ma), fmt_metrics(mb), f"{cosine(a['deltas'], b['deltas']):.3f}")
    table.add_row("median", f"{s_ours:.2f}", f"{s_ee:.2f}", f"{s_ee / s_ours:.2f}x", f"{c_ours:.2f} | {c_ee:.2f}",
                  f"{c_ee / c_ours:.2f}x", "", "", "")
    console.print(table)
    summ = Table(title="ES / PS / NS / Score and the magnitudes EM / PM / NM (our scorer on both edited models)")
    for col in ("model", "ES", "PS", "NS", "Score", "EM", "PM", "NM", "s/edit (median)"):
        summ.add_column(col)
    for name, m, s in (("unedited", m_pre, None), ("ours", m_ours, s_ours), ("EasyEdit", m_ee, s_ee)):
        summ.add_row(name, *[f"{m.get(k, float('nan')):.1f}" for k in ("es", "ps", "ns", "score", "em", "pm", "nm")],
                     "" if s is None else f"{s:.2f}")
    console.print(summ)
    console.print(f"ours {s_ours:.2f} s/edit, EasyEdit {s_ee:.2f} s/edit (medians): ours is {s_ee / s_ours:.2f}x faster "
                  f"per edit in wall time, {c_ee / c_ours:.2f}x in CPU time ({c_ours:.2f} against {c_ee:.2f} CPU s); one-time costs: ours {t_prep:.1f}s (statistics, templates, bf16 copies), EasyEdit "
                  f"{ee['stats_seconds']:.1f}s (statistics from our file) + {ee['load_seconds']:.1f}s (model load); "
                  f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end")
    write_json(out / "summary.json", {
        "method": args.method, "model": args.model, "split": args.split, "threads": args.threads,
        "layers": layers, "compute_dtype": dtype, "easyedit_root": ee["easyedit_root"], "hparams": spec["hparams"],
        "seconds_per_edit": {"ours": s_ours, "easyedit": s_ee, "ratio": s_ee / s_ours},
        "cpu_seconds_per_edit": {"ours": c_ours, "easyedit": c_ee, "ratio": c_ee / c_ours},
        "metrics": {"unedited": m_pre, "ours": m_ours, "easyedit": m_ee},
        "per_batch": [{"case_ids": a["case_ids"], "ours_s": a["seconds"], "easyedit_s": b["seconds"],
                       "ours_cpu_s": a["cpu_seconds"], "easyedit_cpu_s": b["cpu_seconds"],
                       "cos_dw": cosine(a["deltas"], b["deltas"])} for a, b in zip(ours, theirs)],
        "load_average": {"start": load0, "end": load1}})


if __name__ == "__main__":
    main()
