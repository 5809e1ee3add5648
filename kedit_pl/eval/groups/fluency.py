"""Fluency: ROME's generation entropy (GE) of greedy generations from a record's `generation_prompts`.

ROME (Meng et al. 2022, §3 / App. "Fluency"): for each generated text, the Shannon entropies (bits) of its word
bi- and tri-gram frequency distributions, weighted 2/3 and 4/3 (the reference code's weights) and averaged:
    GE(text) = mean(2/3 · H_2, 4/3 · H_3);   record value = mean over its texts;   reported × 100 as in the paper.
A text that repeats itself has few distinct n-grams and a low GE. As in the reference code, the text is the
prompt followed by its continuation. Differences from the paper, on purpose: decoding is greedy (the paper
samples top-5) and 100 tokens are generated after the prompt (the paper's 100 counts the prompt); sentences are
split at . ! ? before nltk's Treebank word tokenizer (the paper uses nltk's Punkt, whose data is not installed).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from statistics import mean

from kedit_pl.data.requests import EditRequest
from kedit_pl.eval.generate import greedy_generate, greedy_generate_states
from kedit_pl.eval.groups.base import MetricGroup

NGRAM_WEIGHTS = {2: 2 / 3, 3: 4 / 3}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def words(text: str) -> list[str]:
    """Word tokens of `text` (NLTK's word tokenizer, sentence by sentence)."""
    from nltk.tokenize import word_tokenize

    return [w for sent in _SENTENCE_END.split(text) for w in word_tokenize(sent, preserve_line=True)]


def ngram_entropy(tokens: list[str], n: int) -> float:
    """Shannon entropy (bits) of the frequency distribution of the text's n-grams (0 when it has none)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def generation_entropy(text: str) -> float:
    """ROME's weighted bi-/tri-gram entropy of one text, in bits (not yet × 100)."""
    toks = words(text)
    return mean(w * ngram_entropy(toks, n) for n, w in NGRAM_WEIGHTS.items())


class Fluency(MetricGroup):
    """Fluency as ROME's generation entropy: greedy generations from the record's generation prompts,
    scored by the weighted entropies of their word bi- and tri-gram distributions."""
    name = "fluency"
    fields = ("generation_prompts",)

    shares_forward = True

    def measure(self, method, requests: list[EditRequest]) -> list[dict]:
        prompts = [p for r in requests for p in r.generation_prompts]
        gens = greedy_generate(method, prompts, self.max_new_tokens, self.batch_size)
        out, i = [], 0
        for r in requests:
            n = len(r.generation_prompts)
            out.append(self._raw(r, gens[i:i + n]))
            i += n
        return out

    def prompts(self, req: EditRequest) -> list[str]:
        return list(req.generation_prompts)

    def measure_states(self, method, requests: list[EditRequest], systems: list) -> list[dict]:
        gens = greedy_generate_states(method, [r.generation_prompts for r in requests], systems, self.max_new_tokens,
                                      self.batch_size)
        return [self._raw(r, g) for r, g in zip(requests, gens)]

    @property
    def max_new_tokens(self) -> int:
        """Tokens generated after each prompt (`eval.fluency.max_new_tokens`)."""
        return int(self.settings.get("max_new_tokens", 100))

    @property
    def batch_size(self) -> int:
        """Prompts generated together (`eval.fluency.batch_size`), on one model state or on several."""
        return int(self.settings.get("batch_size", 160))

    @staticmethod
    def _raw(req: EditRequest, continuations: list[str]) -> dict:
        texts = [p + g for p, g in zip(req.generation_prompts, continuations)]
        return {"ge": [generation_entropy(t) for t in texts], "text": texts[0]}

    @staticmethod
    def numbers(raw: dict) -> dict[str, float]:
        return {"fluency_ge": 100.0 * mean(raw["ge"])}
