"""The knowledge-neuron locating experiment (`python locate.py locate=knowledge_neurons`), Dai et al. §4.3 and §5.2.

1. Known facts: CounterFact records whose unedited model puts target_true's first token at top-1 after the
   rewrite prompt (others are counted and listed as skipped, never used).
2. Each fact's refined neurons (cached attribution over its bag of prompts).
3. Suppress (activation × 0) and amplify (× 2) them at the last token of every prompt of the bag; the relative
   change (P' − P)/P of P(first token of the true object), averaged over the bag, then over facts. Control: as
   many random neurons from the same layers.
4. Where they sit: a histogram over layers.
5. Erase: for the relations with most located facts, zero the value slots of the relation's shared neurons and
   compare true-object accuracy and perplexity on that relation's prompts against the other relations', restoring
   the weights exactly afterwards.
Writes kn_facts.jsonl (one line per located fact, as it goes; `resume=true` reuses it), kn_summary.json and PNGs.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError, EditFailed
from kedit_pl.io import read_jsonl
from kedit_pl.locate.knowledge_neurons import FactNeurons, NeuronAttributor, NeuronLocator, bag_prompts, by_layer

log = logging.getLogger("kedit_pl.locate")


def build_locator(model, tok, spec, ac: DictConfig) -> NeuronLocator:
    """The attributor + refiner of the `attribution` config group (also used by method=kn)."""
    att = NeuronAttributor(model, tok, spec, steps=ac.steps, batch_rows=ac.batch_rows, answer=ac.answer)
    return NeuronLocator(att, ac.cache_dir, ac.threshold, ac.p_start, ac.p_step, ac.min_neurons, ac.max_neurons,
                         ac.refine_iters, ac.max_prompts)


def random_control(fact: FactNeurons, d_ff: int, rng: random.Random) -> list[tuple[int, int]]:
    """As many random neurons as the fact has, each from the same layer as one of its neurons, none of them."""
    taken = set(map(tuple, fact.neurons))
    out = []
    for layer, _ in fact.neurons:
        while True:
            n = (layer, rng.randrange(d_ff))
            if n not in taken:
                taken.add(n), out.append(n)
                break
    return out


def manipulation_effects(att: NeuronAttributor, fact: FactNeurons, target: str, neurons, factors) -> dict[str, float]:
    """Mean over the bag of (P' − P)/P with `neurons`' activations × f, for each factor f."""
    layers = by_layer(neurons)
    out = {}
    for f in factors:
        rel = []
        for prompt, p in zip(fact.prompts, fact.p_clean):
            p2 = att.answer_prob(prompt, target, {layer: (idx, float(f)) for layer, idx in layers.items()})
            rel.append((p2 - p) / p if p > 0 else 0.0)
        out[str(f)] = sum(rel) / len(rel)
    return out


def locate_facts(locator: NeuronLocator, requests: list[EditRequest], lc: DictConfig, out: Path, seed: int,
                 resume: bool) -> tuple[list[dict], dict[str, Any]]:
    """Known facts until `lc.n_records`, each located and manipulated; every finished fact goes to kn_facts.jsonl."""
    from rich.progress import Progress

    from kedit_pl.io import write_text

    path = out / "kn_facts.jsonl"
    rows = read_jsonl(path, "knowledge neurons") if resume else []
    done = {r["case_id"] for r in rows}
    skipped: dict[str, list[str]] = {"unknown": [], "tokenization": [], "no_neurons": []}
    att = locator.att
    d_ff = att.d_ff
    factors = list(lc.factors)
    with Progress(transient=False) as bar:
        task = bar.add_task("knowledge neurons", total=lc.n_records, completed=len(rows))
        for k, req in enumerate(requests):
            if len(rows) >= lc.n_records:
                break
            if req.case_id in done:
                continue
            try:
                top1 = att.top1(req.rewrite)
                answer = att.answer_id(req.target_true)
            except (EditFailed, ValueError):
                skipped["tokenization"].append(req.case_id)
                continue
            if lc.known_only and top1 != answer:
                skipped["unknown"].append(req.case_id)
                continue
            fact = locator.locate(req)
            if not fact.neurons:
                skipped["no_neurons"].append(req.case_id)
                log.warning("case_id=%s: no knowledge neurons after refining (coarse per prompt %s)", req.case_id,
                            fact.coarse_sizes)
                continue
            control = random_control(fact, d_ff, random.Random(seed * 1_000_003 + k))
            row = {"case_id": req.case_id, "relation_id": req.relation_id, "neurons": [list(n) for n in fact.neurons],
                   "control": [list(n) for n in control], "p": fact.p, "coarse_sizes": fact.coarse_sizes,
                   "p_clean": fact.p_clean, "known_prompts": fact.known, "seconds": fact.seconds,
                   "kn": manipulation_effects(att, fact, req.target_true, fact.neurons, factors),
                   "random": manipulation_effects(att, fact, req.target_true, control, factors)}
            rows.append(row)
            write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
            bar.update(task, advance=1, description=f"knowledge neurons ({len(skipped['unknown'])} unknown skipped)")
    return rows, skipped


def summarize(rows: list[dict], skipped: dict[str, list[str]], factors, n_layers: int) -> dict[str, Any]:
    """Mean relative changes (KN vs random), neurons per fact, the layer histogram, s/fact."""
    def mean(xs):
        return sum(xs) / len(xs) if xs else float("nan")

    hist = Counter(n[0] for r in rows for n in r["neurons"])
    total = sum(hist.values())
    computed = [r["seconds"] for r in rows if r["seconds"] > 0]
    effects = {}
    for f in map(str, factors):
        for kind in ("kn", "random"):
            vals = [r[kind][f] for r in rows]
            effects[f"{kind}_x{f}"] = {"mean_rel_change": mean(vals), "median_rel_change": sorted(vals)[len(vals) // 2],
                                       "share_decreased": mean([v < 0 for v in vals])}
    return {"n_facts": len(rows), "skipped": {k: len(v) for k, v in skipped.items()}, "skipped_ids": skipped,
            "neurons_per_fact": mean([len(r["neurons"]) for r in rows]),
            "p_used": dict(Counter(str(r["p"]) for r in rows)), "effects": effects,
            "layer_counts": [hist.get(layer, 0) for layer in range(n_layers)],
            "layer_share": [hist.get(layer, 0) / total if total else 0.0 for layer in range(n_layers)],
            "seconds_per_fact": mean(computed), "n_facts_computed": len(computed)}


def plot_results(summary: dict, out: Path, model_name: str, factors) -> list[Path]:
    """The layer histogram and the suppress/amplify bars (KN vs random)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    share = [100 * s for s in summary["layer_share"]]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(range(len(share)), share, color="tab:blue")
    ax.set_xlabel("layer"), ax.set_ylabel("% of knowledge neurons")
    ax.set_title(f"Knowledge neurons by layer, {model_name} ({summary['n_facts']} facts)")
    fig.tight_layout()
    paths.append(out / "kn_layers.png")
    fig.savefig(paths[-1], dpi=120), plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"×{f}" for f in factors]
    for j, kind in enumerate(("kn", "random")):
        vals = [100 * summary["effects"][f"{kind}_x{f}"]["mean_rel_change"] for f in factors]
        bars = ax.bar([i + 0.4 * j for i in range(len(factors))], vals, width=0.4,
                      label="knowledge neurons" if kind == "kn" else "random neurons (same layers)")
        ax.bar_label(bars, fmt="%+.1f", fontsize=7, padding=2)  # the random control is ~0: print it
    ax.set_xticks([i + 0.2 for i in range(len(factors))], labels)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("mean change of P(true object), %"), ax.legend(fontsize=7)
    ax.set_title(f"Suppress (×0) / amplify (×2), {model_name}", fontsize=9)
    fig.tight_layout()
    paths.append(out / "kn_effects.png")
    fig.savefig(paths[-1], dpi=120), plt.close(fig)
    return paths


@torch.no_grad()
def prompt_scores(model, tok, prompts: list[str], targets: list[str]) -> dict[str, float]:
    """Accuracy (every target token top-1, teacher forced) and perplexity exp(mean per-token NLL)."""
    from kedit_pl.eval.scoring import model_logits, score_pairs

    sc = score_pairs(model_logits(model), tok, prompts, targets, device=next(model.parameters()).device)
    nll = sum(s.nll for s in sc) / len(sc)
    return {"acc": sum(s.acc == 1.0 for s in sc) / len(sc), "ppl": math.exp(nll), "n_prompts": len(sc)}


def erase_experiment(loaded, rows: list[dict], requests: list[EditRequest], ec: DictConfig) -> list[dict]:
    """Erase each chosen relation's shared neurons; accuracy/perplexity on it vs the other relations."""
    from kedit_pl.locate.kn_erase import erase_value_slots, relation_neurons, restore_weights

    per_rel: dict[str, list[list]] = {}
    for r in rows:
        per_rel.setdefault(r["relation_id"], []).append([tuple(n) for n in r["neurons"]])
    rels = list(ec.relations) if ec.relations else [k for k, _ in sorted(per_rel.items(), key=lambda kv: -len(kv[1]))
                                                   [: ec.n_relations]]
    scanned = {r["case_id"] for r in rows}
    pool = [q for q in requests if q.case_id in scanned] if ec.known_only else requests
    results = []
    for rel in rels:
        if rel not in per_rel:
            raise ConfigError(f"locate.erase.relations: no located facts of relation {rel!r}")
        chosen = relation_neurons(per_rel[rel], ec.min_facts, ec.top_k)
        mine = [(p, q.target_true) for q in pool if q.relation_id == rel for p in bag_prompts(q)]
        other = [(p, q.target_true) for q in pool if q.relation_id != rel for p in bag_prompts(q)]
        other = random.Random(0).sample(other, min(len(other), ec.max_other_prompts))
        res: dict[str, Any] = {"relation": rel, "n_facts": len(per_rel[rel]), "n_neurons": len(chosen),
                               "neurons": [[*n, c] for n, c in chosen],
                               "n_held_by_min_facts": sum(c >= ec.min_facts for _, c in relation_neurons(per_rel[rel]))}
        for stage in ("before", "after"):
            handle = erase_value_slots(loaded.model, loaded.spec, [n for n, _ in chosen]) if stage == "after" else None
            try:
                res[stage] = {"relation": prompt_scores(loaded.model, loaded.tokenizer, *map(list, zip(*mine))),
                              "other": prompt_scores(loaded.model, loaded.tokenizer, *map(list, zip(*other)))}
            finally:
                if handle is not None:
                    restore_weights(loaded.model, handle)
        results.append(res)
        log.info("erase %s (%d neurons): acc %.3f -> %.3f, ppl %.1f -> %.1f; other relations acc %.3f -> %.3f, "
                 "ppl %.1f -> %.1f", rel, len(chosen), res["before"]["relation"]["acc"], res["after"]["relation"]["acc"],
                 res["before"]["relation"]["ppl"], res["after"]["relation"]["ppl"], res["before"]["other"]["acc"],
                 res["after"]["other"]["acc"], res["before"]["other"]["ppl"], res["after"]["other"]["ppl"])
    return results


def run_knowledge_neurons(cfg: DictConfig) -> dict:
    """`locate=knowledge_neurons`: locate, manipulate, histogram, erase; JSON and figures in the run folder."""
    from kedit_pl.data.readers import read_requests
    from kedit_pl.io import write_json
    from kedit_pl.models.load import load_model

    lc, out = cfg.locate, Path(cfg.paths.output_dir)
    loaded = load_model(cfg.model)
    requests = [r for r, _ in read_requests(cfg.dataset.format, cfg.dataset.path) if r is not None][: lc.max_scan]
    if not requests:
        raise ConfigError(f"dataset.path: no valid records in {cfg.dataset.path}")
    locator = build_locator(loaded.model, loaded.tokenizer, loaded.spec, cfg.attribution)
    started = time.perf_counter()
    rows, skipped = locate_facts(locator, requests, lc, out, int(cfg.seed), bool(cfg.get("resume", False)))
    if not rows:
        raise ConfigError(f"no facts located ({ {k: len(v) for k, v in skipped.items()} }); try a larger "
                          f"locate.max_scan or locate.known_only=false")
    summary = summarize(rows, skipped, list(lc.factors), loaded.spec.n_layers)
    summary.update(model=cfg.model.name, wall_seconds=time.perf_counter() - started,
                   attribution=dict(cfg.attribution), factors=list(lc.factors))
    if lc.erase.n_relations or lc.erase.relations:
        summary["erase"] = erase_experiment(loaded, rows, requests, lc.erase)
    summary["figures"] = [str(p) for p in plot_results(summary, out, cfg.model.name, list(lc.factors))]
    write_json(out / "kn_summary.json", summary)
    e = summary["effects"]
    effects = "; ".join(f"x{f}: KN {100 * e[f'kn_x{f}']['mean_rel_change']:+.1f}% vs random "
                        f"{100 * e[f'random_x{f}']['mean_rel_change']:+.1f}%" for f in lc.factors)
    log.info("located %d facts (%.1f s/fact computed), %.2f neurons/fact; %s; results in %s", len(rows),
             summary["seconds_per_fact"], summary["neurons_per_fact"], effects, out)
    return summary
