"""The causal-tracing run (`python locate.py locate=causal_trace`, alias `python trace.py`): many facts, averages,
figures, W&B. The tracing itself is `causal_trace.py`."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.io import read_jsonl

log = logging.getLogger("kedit_pl.trace")


def trace_facts(tracer, requests, tc: DictConfig, out: Path, resume: bool = False) -> tuple[list, dict[str, int]]:
    """Trace up to `tc.n_records` facts (known ones if `tc.known_only`), with a progress bar.

    Every finished fact is saved at once to traces.jsonl; with `resume`, facts already there are reused.
    """
    from rich.progress import Progress

    from kedit_pl.io import write_text
    from kedit_pl.locate.causal_trace import TraceResult

    path = out / "traces.jsonl"
    results = [TraceResult.from_dict(x) for x in read_jsonl(path, "causal tracing")] if resume else []
    done = {r.case_id for r in results}
    lines = [json.dumps(r.to_dict()) for r in results]
    skipped = {"unknown": 0, "tokenization": 0}
    target = tc.answer == "target_true"
    with Progress(transient=False) as bar:
        task = bar.add_task("tracing", total=tc.n_records, completed=len(results))
        for req in requests:
            if len(results) >= tc.n_records:
                break
            if req.case_id in done:
                continue
            try:
                # a known fact's top-1 is target_true's first token, so o is the same under either answer mode
                r = tracer.trace(req.prompt, req.subject, req.target_true if (target or tc.known_only) else None,
                                 kinds=list(tc.kinds), require_correct=tc.known_only, case_id=req.case_id)
            except EditFailed:
                skipped["tokenization"] += 1
                continue
            if r is None:
                skipped["unknown"] += 1
                continue
            results.append(r)
            lines.append(json.dumps(r.to_dict()))
            write_text(path, "\n".join(lines) + "\n")
            bar.update(task, advance=1, description=f"tracing ({skipped['unknown']} unknown skipped)")
    return results, skipped


def summarize(results, tc: DictConfig, nu: float, skipped: dict[str, int], seconds: float) -> tuple[dict, dict, dict]:
    """average.json content, the tensors for average.safetensors, and the raw averages (for plots)."""
    from kedit_pl.locate.causal_trace import average_effects, suggest_edit_layers

    avg = average_effects(results, list(tc.kinds))
    summary: dict[str, Any] = {k: avg[k] for k in ("n_facts", "p_clean", "p_corrupt", "total_effect")}
    summary.update(noise_std=nu, n_samples=tc.n_samples, window=tc.window, answer=tc.answer,
                   known_only=tc.known_only, skipped=skipped, wall_seconds=seconds,
                   seconds_per_fact=sum(r.seconds for r in results) / len(results))
    tensors = {}
    for kind in tc.kinds:
        summary[kind] = {g: {"mean": d["mean"].tolist(), "n": d["n"]} for g, d in avg[kind].items()}
        for g, d in avg[kind].items():
            tensors[f"{kind}.{g}.mean"], tensors[f"{kind}.{g}.std"] = d["mean"], d["std"]
        summary[f"best_{kind}_last_subject"] = int(torch.nan_to_num(avg[kind]["last_subject"]["mean"], -1.0).argmax())
    if "mlp" in tc.kinds:
        mlp = avg["mlp"]["last_subject"]["mean"]
        summary["suggested"] = suggest_edit_layers(mlp, tc.early_frac, tc.memit_rel, tc.memit_max_span)
    return summary, tensors, avg


def write_figures(results, avg: dict, tc: DictConfig, out: Path, model_name: str) -> list[Path]:
    """Write the averaged heatmaps and line plots, and the first `n_heatmaps` per-fact heatmaps; returns their paths."""
    from kedit_pl.locate.plots import plot_average_heatmap, plot_average_lines, plot_trace_heatmap

    paths = [plot_average_heatmap(avg, k, out / f"avg_{k}.png", model_name, tc.window) for k in tc.kinds]
    paths.append(plot_average_lines(avg, out / "avg_lines.png", list(tc.kinds), model_name=model_name, window=tc.window))
    paths.append(plot_average_lines(avg, out / "avg_subject_vs_last.png", list(tc.kinds), ("last_subject", "last"),
                                    model_name, tc.window))
    for r in results[: tc.n_heatmaps]:
        paths += [plot_trace_heatmap(r, k, out / "cases" / f"{r.case_id}_{k}.png", model_name) for k in tc.kinds]
    return paths


def log_wandb(cfg: DictConfig, out: Path, summary: dict, figures: list[Path]) -> None:
    """Figures and headline numbers to W&B when `logger=wandb` (offline unless logger.wandb.offline=false)."""
    lg = (cfg.get("logger") or {}).get("wandb")
    if not lg:
        return
    import wandb

    run = wandb.init(project=lg.get("project", "kedit_pl"), mode="offline" if lg.get("offline", True) else "online",
                     dir=str(out), name=f"trace-{cfg.model.name}", job_type="trace",
                     config=OmegaConf.to_container(cfg.locate, resolve=True))
    run.log({str(p.relative_to(out).with_suffix("")): wandb.Image(str(p)) for p in figures})
    run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    if "suggested" in summary:
        run.summary.update({f"suggested/{k}": v for k, v in summary["suggested"].items()})
    run.finish()


def run_causal_trace(cfg: DictConfig) -> dict:
    """`locate=causal_trace`: trace facts, average, write JSON, safetensors and figures into the run folder."""
    from kedit_pl.data.readers import read_requests
    from kedit_pl.io import save_tensors, write_json
    from kedit_pl.locate.causal_trace import CausalTracer, embedding_std
    from kedit_pl.models.load import load_model

    tc, out = cfg.locate, Path(cfg.paths.output_dir)
    if tc.answer not in ("target_true", "predicted"):
        raise ConfigError(f"locate.answer: {tc.answer!r}; use target_true or predicted")
    bad = [k for k in tc.kinds if k not in ("hidden", "mlp", "attn")]
    if bad or not tc.kinds:
        raise ConfigError(f"locate.kinds: {list(tc.kinds)}; choose from hidden, mlp, attn")
    torch.set_grad_enabled(False)
    loaded = load_model(cfg.model)
    requests = [r for r, err in read_requests(cfg.dataset.format, cfg.dataset.path) if r is not None][: tc.max_scan]
    if not requests:
        raise ConfigError(f"dataset.path: no valid records in {cfg.dataset.path}")
    nu = tc.noise_std
    if nu is None:
        std = embedding_std(loaded.model, loaded.tokenizer, loaded.spec, [r.subject for r in requests[: tc.n_std_subjects]])
        nu = tc.noise_multiplier * std
        log.info("noise: %.3g x embedding std %.4g = %.4g", tc.noise_multiplier, std, nu)
    tracer = CausalTracer(loaded.model, loaded.tokenizer, loaded.spec, nu, tc.n_samples, tc.window, tc.batch_rows,
                          cfg.seed)
    started = time.perf_counter()
    results, skipped = trace_facts(tracer, requests, tc, out, bool(cfg.get("resume", False)))
    if not results:
        raise ConfigError(f"no facts traced ({skipped}); try locate.known_only=false or a larger locate.max_scan")
    summary, tensors, avg = summarize(results, tc, nu, skipped, time.perf_counter() - started)
    save_tensors(out / "average.safetensors", tensors, metadata={"model": cfg.model.name, "n_facts": str(len(results))})
    figures = write_figures(results, avg, tc, out, cfg.model.name)
    write_json(out / "average.json", summary)
    log_wandb(cfg, out, summary, figures)
    log.info("traced %d facts (%.1f s/fact), avg TE %.3f; suggested %s; results in %s", len(results),
             summary["seconds_per_fact"], summary["total_effect"], summary.get("suggested"), out)
    return summary
