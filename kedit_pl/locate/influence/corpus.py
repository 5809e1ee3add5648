"""An FTRACE-style fact-tracing benchmark built from CounterFact (Akyürek et al. 2022, rebuilt offline).

Facts are CounterFact records, split at random into *taught* and *never-taught* (control) facts. The corpus:
- **proponents**: each taught fact's counterfactual statement in the record's own phrasings, the rewrite prompt
  and each paraphrase completed with target_new (the ground truth of the benchmark);
- **same-relation statements**: other subjects' true facts of the fact's relation: neighborhood prompts completed
  with target_true, attribute prompts (other subjects whose true object is target_new) completed with target_new;
- **same-subject statements**: other CounterFact records about the fact's subject (the EasyEdit split files),
  completed with their true object;
- **WikiText-2 paragraphs** (their first sentences, up to `wikitext_max_words` words).
Control facts contribute distractors but never a statement of themselves. Statements that would contradict or
repeat a benchmark fact (a distractor mentioning a benchmark subject, a same-subject statement whose object is
that subject's true or new object) are left out. Queries: each taught fact's rewrite prompt, answer target_new.

The build is deterministic (seeded) and takes seconds, so every entry point rebuilds the same corpus from the
`ftrace` config; `Benchmark.digest` names it, and teaching checkpoints record it.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from kedit_pl.config import missing_data
from kedit_pl.data.readers import read_json_records, read_requests
from kedit_pl.data.requests import EditRequest, normalize_target
from kedit_pl.errors import ConfigError

#: document kinds
PROPONENT, RELATION, SUBJECT, WIKITEXT = "proponent", "relation", "subject", "wikitext"


@dataclass(frozen=True)
class Document:
    """A training example: `prompt` followed by `target` (the cloze answer; empty for running text, whose every
    token is then a label)."""

    id: str
    prompt: str
    target: str = ""
    kind: str = WIKITEXT
    fact: str | None = None        # case_id of the fact this document states (proponents only)

    @property
    def text(self) -> str:
        """The document as one string: prompt and target."""
        return f"{self.prompt} {self.target}".strip() if self.target else self.prompt


@dataclass(frozen=True)
class Query:
    """A factual query: the model should continue `prompt` with `answer`."""

    id: str
    prompt: str
    answer: str
    fact: str | None = None

    @property
    def text(self) -> str:
        """The query as one string: prompt and answer."""
        return f"{self.prompt} {self.answer}".strip()


@dataclass
class Benchmark:
    """The FTRACE-style benchmark: corpus, queries, taught and control facts, and statistics."""
    corpus: list[Document]
    queries: list[Query]
    taught: list[EditRequest]
    control: list[EditRequest]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        """Digest of the corpus (checkpoints are tied to it)."""
        return corpus_digest(self.corpus)

    def proponents(self) -> dict[str, list[int]]:
        """fact case_id -> indices of its proponent documents."""
        out: dict[str, list[int]] = {}
        for i, d in enumerate(self.corpus):
            if d.kind == PROPONENT and d.fact is not None:
                out.setdefault(d.fact, []).append(i)
        return out


def corpus_digest(corpus: Iterable[Document]) -> str:
    """Digest of the documents' text and targets, in order."""
    h = hashlib.sha256()
    for d in corpus:
        h.update(json.dumps([d.prompt, d.target]).encode())
    return h.hexdigest()[:24]


def wikitext_paragraphs(path: str | Path, max_words: int, min_words: int = 12) -> list[str]:
    """Body paragraphs of a raw WikiText file (no headings), detokenized, cut to their first sentences."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing_data("ftrace.wikitext", path))
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("="):
            continue
        text = detokenize(line)
        words = text.split()
        if len(words) < min_words:
            continue
        out.append(first_sentences(words, max_words))
    return out


def detokenize(text: str) -> str:
    """Undo WikiText's tokenization (' @-@ ', ' , ', ' 's', ...) enough for BM25 and the model."""
    text = re.sub(r" @(.)@ ", r"\1", text)
    text = re.sub(r" ([.,;:!?)'%])", r"\1", text)
    text = re.sub(r"([($]) ", r"\1", text)
    return text.replace(" n't", "n't").replace('" ', '"', 0)


def first_sentences(words: list[str], max_words: int) -> str:
    """The longest run of whole sentences within `max_words` words (or the first `max_words` words)."""
    head = words[:max_words]
    ends = [i for i, w in enumerate(head) if w.endswith((".", "!", "?")) and i >= 5]
    return " ".join(head[: ends[-1] + 1] if ends else head)


def _subject_pattern(subjects: Iterable[str]) -> re.Pattern | None:
    names = sorted({s for s in subjects if s}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(" + "|".join(map(re.escape, names)) + r")(?!\w)") if names else None


def build_benchmark(cfg: Mapping[str, Any]) -> Benchmark:
    """Build corpus, queries and the taught / never-taught split from the `ftrace` config node."""
    n_taught, n_control = int(cfg["n_taught"]), int(cfg["n_control"])
    if n_taught < 1 or n_control < 0:
        raise ConfigError(f"ftrace.n_taught/n_control: need n_taught >= 1, n_control >= 0; got {n_taught}, {n_control}")
    rng = random.Random(int(cfg.get("seed", 0)))
    rows = {str(r["case_id"]): r for r in read_json_records(cfg["source"])}
    facts = [r for r, _ in read_requests("counterfact", cfg["source"]) if r is not None and r.paraphrases]
    by_subject: dict[str, list[EditRequest]] = {}
    for f in facts:
        by_subject.setdefault(f.subject, []).append(f)
    facts = [f for f in facts if len(by_subject[f.subject]) == 1]  # one fact per subject: no conflicting proponents
    rng.shuffle(facts)
    if len(facts) < n_taught + n_control:
        raise ConfigError(f"ftrace.n_taught + n_control = {n_taught + n_control} but {cfg['source']} has only "
                          f"{len(facts)} usable facts")
    taught, control = facts[:n_taught], facts[n_taught:n_taught + n_control]
    chosen = taught + control
    mentions = _subject_pattern(f.subject for f in chosen)

    docs: list[Document] = []
    seen: set[tuple[str, str]] = set()

    def add(prompt: str, target: str, kind: str, fact: str | None = None) -> None:
        prompt, target = prompt.strip(), normalize_target(target)
        key = (prompt, target)
        if not prompt or key in seen:
            return
        seen.add(key)
        docs.append(Document(f"{kind[0]}{len(docs)}", prompt, target, kind, fact))

    for f in taught:  # ground-truth proponents, in the record's own phrasings
        for p in (f.rewrite, *f.paraphrases):
            add(p, f.target_new, PROPONENT, f.case_id)
    k_rel, k_attr = int(cfg["relation_per_fact"]), int(cfg["attribute_per_fact"])
    for f in chosen:  # other subjects' facts of the same relation
        row = rows[f.case_id]
        neigh = [p for p in f.neighborhood if not (mentions and mentions.search(p))]
        for p in rng.sample(neigh, min(k_rel, len(neigh))):
            add(p, f.target_true, RELATION)
        attr = [p for p in row.get("attribute_prompts") or [] if not (mentions and mentions.search(p))]
        for p in rng.sample(attr, min(k_attr, len(attr))):
            add(p, f.target_new, RELATION)
    _add_same_subject(cfg, chosen, int(cfg["subject_per_fact"]), rng, add)
    wiki = wikitext_paragraphs(cfg["wikitext"], int(cfg["wikitext_max_words"]))
    wiki = [w for w in wiki if not (mentions and mentions.search(w))]
    for p in rng.sample(wiki, min(int(cfg["n_wikitext"]), len(wiki))):
        add(p, "", WIKITEXT)
    queries = [Query(f.case_id, f.rewrite, f.target_new, f.case_id) for f in taught]
    counts: dict[str, int] = {}
    for d in docs:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    stats = {"n_documents": len(docs), "by_kind": counts, "n_taught": len(taught), "n_control": len(control),
             "n_queries": len(queries)}
    return Benchmark(docs, queries, taught, control, stats)


def _add_same_subject(cfg: Mapping[str, Any], chosen: list[EditRequest], k: int, rng: random.Random, add) -> None:
    """True statements of other CounterFact records about each chosen fact's subject (EasyEdit split files)."""
    if k <= 0:
        return
    wanted = {f.subject: f for f in chosen}
    ids = {f.case_id for f in chosen}
    found: dict[str, list[tuple[str, str]]] = {}
    for path in cfg.get("same_subject_sources") or []:
        for r in read_json_records(path):
            f = wanted.get(r.get("subject"))
            if f is None or str(r.get("case_id")) in ids:
                continue
            answer = normalize_target(str(r.get("ground_truth", "")))
            if answer and answer not in (f.target_true, f.target_new):  # never restate or contradict the fact
                found.setdefault(f.subject, []).append((r["prompt"], answer))
    for subject in sorted(found):
        for prompt, answer in rng.sample(found[subject], min(k, len(found[subject]))):
            add(prompt, answer, SUBJECT)


def write_benchmark(bench: Benchmark, folder: str | Path) -> None:
    """corpus.jsonl, queries.jsonl and facts.json (taught / control case_ids, stats) into `folder`."""
    from kedit_pl.io import write_json, write_text

    folder = Path(folder)
    write_text(folder / "corpus.jsonl", "".join(json.dumps(asdict(d)) + "\n" for d in bench.corpus))
    write_text(folder / "queries.jsonl", "".join(json.dumps(asdict(q)) + "\n" for q in bench.queries))
    write_json(folder / "facts.json", {"digest": bench.digest, "stats": bench.stats,
                                       "taught": [f.case_id for f in bench.taught],
                                       "control": [f.case_id for f in bench.control]})
