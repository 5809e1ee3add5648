"""BM25 (Robertson et al.), the information-retrieval baseline of fact tracing: lexical overlap between the query
(prompt + answer) and each document, from the `bm25s` package (Lucene's BM25 variant, English stopwords)."""
from __future__ import annotations

import time

import torch

from kedit_pl.locate.influence.base import InfluenceMethod
from kedit_pl.locate.influence.corpus import Document, Query


class BM25(InfluenceMethod):
    """BM25 over the document text (`bm25s`): the lexical baseline of fact tracing."""
    name = "bm25"
    needs_model = False

    def __init__(self, k1: float = 1.5, b: float = 0.75, stopwords: str | None = "en", name: str = "bm25",
                 **_context) -> None:
        self.k1, self.b, self.stopwords, self.name = k1, b, stopwords, name
        self._timing: dict[str, float] = {}

    def _rank(self, queries: list[Query], corpus: list[Document]) -> torch.Tensor:
        import bm25s

        t0 = time.perf_counter()
        retriever = bm25s.BM25(k1=self.k1, b=self.b)
        retriever.index(bm25s.tokenize([d.text for d in corpus], stopwords=self.stopwords, show_progress=False),
                        show_progress=False)
        t1 = time.perf_counter()
        q_tokens = bm25s.tokenize([q.text for q in queries], stopwords=self.stopwords, show_progress=False,
                                  return_ids=False)
        scores = torch.tensor([retriever.get_scores(toks) for toks in q_tokens], dtype=torch.float32)
        t2 = time.perf_counter()
        self._timing = {"s_per_document": (t1 - t0) / len(corpus), "s_per_query": (t2 - t1) / len(queries)}
        return scores

    def timing(self) -> dict[str, float]:
        return self._timing
