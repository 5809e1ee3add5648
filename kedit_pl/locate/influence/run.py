"""The fact-tracing run (`python locate.py locate=tracin|tracin_cosine|embedding|bm25`).

`locate.task: benchmark` (Akyürek et al. 2022): rank the FTRACE-style corpus for every taught fact's query,
then score each query's candidates (all its proponents, the BM25 top-100, 100 documents with the same target,
100 random ones) by the method; MRR / P@10 / R@10 over all queries, over the queries the fine-tuning taught
(wrong before, right after: the paper's "fine-tune-learned" slice), and without the proponent that repeats the
query verbatim. `locate.task: illustrate`: for a few facts the unedited model knows, the top WikiText paragraphs
(no ground truth: an illustration). Writes influence_summary.json, rankings.jsonl (or illustration.json/.md).
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from kedit_pl.errors import ConfigError
from kedit_pl.eval.tracing import query_metrics, summarize
from kedit_pl.locate.influence.base import InfluenceMethod, build_method
from kedit_pl.locate.influence.corpus import WIKITEXT, Benchmark, Document, Query

log = logging.getLogger("kedit_pl.locate")


def candidate_sets(bench: Benchmark, queries: list[Query], bm25: torch.Tensor,
                   cc: DictConfig | dict) -> list[list[int]]:
    """Per query, the FTRACE candidate set: proponents ∪ BM25 top-n ∪ n with the same target ∪ n random."""
    props = bench.proponents()
    by_target: dict[str, list[int]] = {}
    for i, d in enumerate(bench.corpus):
        if d.target:
            by_target.setdefault(d.target, []).append(i)
    n_docs = len(bench.corpus)
    top = bm25.topk(min(int(cc["bm25_top"]), n_docs), dim=1).indices.tolist()
    out = []
    for qi, q in enumerate(queries):
        rng = random.Random(int(cc["seed"]) * 1_000_003 + qi)
        same = by_target.get(q.answer, [])
        cand = dict.fromkeys(props.get(q.fact, []) + top[qi] + rng.sample(same, min(int(cc["same_target"]), len(same)))
                             + rng.sample(range(n_docs), min(int(cc["random"]), n_docs)))
        out.append(list(cand))
    return out


def evaluate(scores: torch.Tensor, bench: Benchmark, queries: list[Query], cands: list[list[int]], k: int, seed: int,
             keep: set[str] | None = None) -> dict[str, Any]:
    """Metrics over the candidate sets: all proponents, and without the one that repeats the query verbatim."""
    props = bench.proponents()
    rows, rows_nv, ranked_all = [], [], []
    for qi, q in enumerate(queries):
        if keep is not None and q.fact not in keep:
            continue
        cand = list(cands[qi])
        random.Random(seed + qi).shuffle(cand)  # ties never favour the proponents (listed first)
        s = scores[qi, cand]
        ranked = [cand[j] for j in torch.argsort(s, descending=True, stable=True).tolist()]
        relevant = set(props.get(q.fact, []))
        rows.append(query_metrics(ranked, relevant, k))
        verbatim = {i for i in relevant if bench.corpus[i].text == q.text}
        rel_nv = relevant - verbatim
        if rel_nv:
            rows_nv.append(query_metrics([i for i in ranked if i not in verbatim], rel_nv, k))
        ranked_all.append((qi, ranked))
    return {"all": summarize(rows, k), "no_verbatim": summarize(rows_nv, k), "_ranked": ranked_all}


def _fl_facts(lc: DictConfig) -> set[str] | None:
    """Facts the teaching made right (rewrite ES false before, true after), from the teaching run's facts_es.json."""
    if not lc.checkpoints:
        return None
    spec = lc.checkpoints
    first = Path(spec if isinstance(spec, str) else list(spec)[0])
    run = first.parent if first.is_dir() else first.parent.parent
    path = run / "facts_es.json"
    if not path.is_file():
        return None
    es = json.loads(path.read_text())
    return {c for c, ok in es["post"].items() if ok and not es["pre"].get(c, True)}


def _method(cfg: DictConfig, bench_digest: str | None) -> tuple[InfluenceMethod, Any]:
    """The configured method with its context: the loaded model and the checkpoints, when it needs them."""
    import hydra

    from kedit_pl.locate.influence.checkpoints import checkpoint_files, load_checkpoints

    lc = cfg.locate
    mc = OmegaConf.to_container(lc.method, resolve=True)
    try:
        cls = hydra.utils.get_class(mc.get("_target_", ""))
    except Exception as e:
        raise ConfigError(f"locate.method._target_: cannot import {mc.get('_target_')!r} ({e})") from None
    context: dict[str, Any] = {"cache_dir": Path(cfg.paths.cache_dir) / "influence"}
    loaded = None
    if getattr(cls, "needs_model", True):
        from kedit_pl.models.load import load_model

        loaded = load_model(cfg.model)
        files = checkpoint_files(lc.checkpoints if isinstance(lc.checkpoints, str) else list(lc.checkpoints)) \
            if lc.checkpoints and lc.task == "benchmark" else []
        context.update(model=loaded, checkpoints=load_checkpoints(files, loaded.model, cfg.model.name, bench_digest))
    return build_method(mc, **context), loaded


def run_influence(cfg: DictConfig) -> dict[str, Any]:
    """`locate.py locate=<influence method>`: build the benchmark, rank it (or illustrate), write the summary."""
    from kedit_pl.locate.influence.corpus import build_benchmark, write_benchmark

    lc, out = cfg.locate, Path(cfg.paths.output_dir)
    if lc.task not in ("benchmark", "illustrate"):
        raise ConfigError(f"locate.task: {lc.task!r}; use benchmark or illustrate")
    bench = build_benchmark(OmegaConf.to_container(cfg.ftrace, resolve=True))
    write_benchmark(bench, out)
    if lc.task == "illustrate":
        return illustrate(cfg, bench)
    method, _ = _method(cfg, bench.digest)
    queries = bench.queries[: lc.n_queries] if lc.n_queries else bench.queries
    started = time.perf_counter()
    scores = method.rank(queries, bench.corpus)
    rank_seconds = time.perf_counter() - started
    from kedit_pl.locate.influence.bm25 import BM25

    bm25 = scores if isinstance(method, BM25) else BM25().rank(queries, bench.corpus)
    cands = candidate_sets(bench, queries, bm25, lc.candidates)
    k, seed = int(lc.top_k), int(lc.candidates.seed)
    res = evaluate(scores, bench, queries, cands, k, seed)
    fl = _fl_facts(lc)
    metrics = {"all": res["all"], "no_verbatim": res["no_verbatim"]}
    if fl is not None:
        sub = evaluate(scores, bench, queries, cands, k, seed, keep=fl)
        metrics.update(finetune_learned=sub["all"], finetune_learned_no_verbatim=sub["no_verbatim"])
    summary = {"method": method.name, "model": cfg.model.name, "corpus": bench.stats | {"digest": bench.digest},
               "n_queries": len(queries), "candidates": {"mean_size": sum(map(len, cands)) / len(cands),
                                                         **OmegaConf.to_container(lc.candidates)},
               "metrics": metrics, "timing": method.timing() | {"rank_seconds": rank_seconds},
               "checkpoints": [str(c) for c in ([lc.checkpoints] if isinstance(lc.checkpoints, str)
                                                else list(lc.checkpoints or []))],
               "config": OmegaConf.to_container(lc, resolve=True)}
    _write_rankings(out / "rankings.jsonl", bench, queries, scores, res["_ranked"], k)
    from kedit_pl.io import write_json

    write_json(out / "influence_summary.json", summary)
    for name, m in metrics.items():
        log.info("%s %-28s MRR %5.1f  R@%d %5.1f  P@%d %5.1f  (%d queries)", method.name, name, m["mrr"], k,
                 m[f"r@{k}"], k, m[f"p@{k}"], m["n_queries"])
    log.info("timing %s; results in %s", summary["timing"], out)
    return summary


def _write_rankings(path: Path, bench: Benchmark, queries: list[Query], scores: torch.Tensor, ranked, k: int) -> None:
    from kedit_pl.io import write_text

    props = bench.proponents()
    lines = []
    for qi, order in ranked:
        q = queries[qi]
        top = [{"doc": bench.corpus[i].id, "kind": bench.corpus[i].kind, "text": bench.corpus[i].text,
                "score": float(scores[qi, i]), "proponent": i in set(props.get(q.fact, []))} for i in order[:k]]
        lines.append(json.dumps({"query": q.id, "text": q.text, "top": top}))
    write_text(path, "\n".join(lines) + "\n")


@torch.no_grad()
def known_facts(loaded, requests, n: int) -> list:
    """Requests whose target_true's first token is the unedited model's top-1 after the rewrite prompt."""
    from kedit_pl.tokens import prompt_ids, target_ids

    out = []
    for r in requests:
        ids = torch.tensor([prompt_ids(loaded.tokenizer, r.rewrite)])
        if int(loaded.model(input_ids=ids).logits[0, -1].argmax()) == target_ids(loaded.tokenizer, r.target_true)[0]:
            out.append(r)
            if len(out) >= n:
                break
    return out


def illustrate(cfg: DictConfig, bench: Benchmark) -> dict[str, Any]:
    """Top WikiText paragraphs for a few known facts of the unedited model (illustration, no ground truth)."""
    from kedit_pl.data.readers import read_requests
    from kedit_pl.io import write_json, write_text

    ic, out = cfg.locate.illustrate, Path(cfg.paths.output_dir)
    wiki = [d for d in bench.corpus if d.kind == WIKITEXT]
    if not wiki:
        raise ConfigError("ftrace.n_wikitext: the corpus has no WikiText paragraphs to illustrate with")
    method, loaded = _method(cfg, None)
    used = {f.case_id for f in bench.taught + bench.control}
    reqs = [r for r, _ in read_requests("counterfact", cfg.ftrace.source) if r is not None and r.case_id not in used]
    mentioned = [r for r in reqs if len(r.subject) >= 4 and any(_mentions(r.subject, d.text) for d in wiki)]
    if loaded is None:
        from kedit_pl.models.load import load_model

        loaded = load_model(cfg.model)
    scan = mentioned[: int(ic.max_scan)]
    facts = known_facts(loaded, scan, int(ic.n_facts)) if ic.known_only else scan[: int(ic.n_facts)]
    if not facts:
        raise ConfigError("locate.illustrate: no known fact whose subject appears in the WikiText paragraphs")
    # the paragraphs that mention the facts' subjects, plus seeded others up to illustrate.n_paragraphs
    hit = [d for d in wiki if any(_mentions(f.subject, d.text) for f in facts)]
    rest = [d for d in wiki if d not in hit]
    wiki = hit + random.Random(0).sample(rest, max(0, min(len(rest), int(ic.n_paragraphs) - len(hit))))
    queries = [Query(f.case_id, f.rewrite, f.target_true, f.case_id) for f in facts]
    scores = method.rank(queries, wiki)
    k = int(ic.top_k)
    rows = []
    for qi, q in enumerate(queries):
        top = torch.topk(scores[qi], min(k, len(wiki))).indices.tolist()
        rows.append({"query": q.text, "subject": facts[qi].subject,
                     "top": [{"text": wiki[i].text, "score": float(scores[qi, i]),
                              "mentions_subject": _mentions(facts[qi].subject, wiki[i].text)} for i in top]})
    write_json(out / "illustration.json", {"method": method.name, "model": cfg.model.name, "facts": rows,
                                           "n_paragraphs": len(wiki), "timing": method.timing()})
    md = [f"### {method.name} (unedited {cfg.model.name}, {len(wiki)} WikiText paragraphs; illustration, "
          f"no ground truth)", ""]
    for r in rows:
        md += [f"**{r['query']}**", ""]
        md += [f"{j + 1}. {'(mentions the subject) ' if t['mentions_subject'] else ''}{t['text'][:160]}"
               for j, t in enumerate(r["top"])] + [""]
    write_text(out / "illustration.md", "\n".join(md))
    log.info("illustration of %d facts over %d paragraphs in %s", len(rows), len(wiki), out / "illustration.md")
    return {"facts": rows}


def _mentions(subject: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", text) is not None
