"""Knowledge neurons (Dai et al., ACL 2022): integrated-gradient attribution, refining, shared neurons.

An MLP is a key-value memory: its intermediate activation w^(l) (the INPUT of the output projection; for gated
MLPs act(gate)·up) holds the keys, and column i of the output projection is neuron i's value slot.

Attribution (§3.2, eq. 3), at the last prompt token, for P = P(first token of the gold object | prompt):
    Attr(w_i^(l)) = w̄_i^(l) ∫_0^1 ∂P(α w̄^(l)) / ∂w_i^(l) dα  ≈  w̄_i^(l)/m · Σ_{k=1..m} ∂P(k/m · w̄^(l)) / ∂w_i^(l)
where only layer l's activation at that one position is scaled (zero baseline) and every other layer runs clean.
By completeness, Σ_i Attr(w_i^(l)) ≈ P(x) − P(x with w̄^(l) = 0 at the last position).

Speed: positions before the last prompt token do not depend on its intermediate activations (causal attention),
so the m scaled copies × many layers run as one batch of single-token rows on a shared prefix key/value cache,
one forward and one backward per chunk of `batch_rows` rows of contiguous layers. The layers below a chunk see the
same clean state in every row: they run on one row, widened to the batch where the chunk starts, and the backward
stops there. `prefix_cache=False` runs the plain full-sequence computation, which the tests compare against.

Refining (§3.3): coarse neurons of a prompt have Attr ≥ t × max (max over all layers, t = 0.2); a fact's neurons
are the coarse neurons shared by ≥ p of its bag of prompts, p adapted from 0.7 in steps of 0.05 until 2..5 remain.
A relation's shared neurons are held by ≥ 10 % of its facts.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.digests import weights_digest
from kedit_pl.hooks import capture, edit_inputs
from kedit_pl.io import cache_root, read_cache, save_cache
from kedit_pl.models.kv_cache import cache_kwargs, cache_layers, new_cache, output_cache
from kedit_pl.errors import ConfigError
from kedit_pl.models.spec import ModelSpec, linear_weight
from kedit_pl.tokens import prompt_ids, target_ids

log = logging.getLogger(__name__)

Neuron = tuple[int, int]  # (layer, index of the intermediate neuron)


# ---- attribution --------------------------------------------------------------------------------------
@dataclass
class PromptAttribution:
    """Attribution scores (n_layers, d_ff) of one prompt, P(x) of the answer token and the clean top-1 token."""

    scores: torch.Tensor
    p_clean: float
    top1: int


class NeuronAttributor:
    """Integrated gradients over the intermediate neurons of every layer at the last prompt token."""

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, steps: int = 20,
                 batch_rows: int = 200, prefix_cache: bool = True, answer: str = "first_token") -> None:
        if steps < 1 or batch_rows < 1:
            raise ConfigError(f"attribution.steps / batch_rows: must be >= 1, got {steps}, {batch_rows}")
        if answer != "first_token":
            raise ConfigError(f"attribution.answer: {answer!r}; only first_token is implemented")
        self.model, self.tok, self.spec = model, tok, spec
        self.steps, self.batch_rows, self.prefix_cache = int(steps), int(batch_rows), bool(prefix_cache)
        self.device = next(model.parameters()).device
        self.names = [spec.module_name("mlp_out", layer) for layer in range(spec.n_layers)]
        # the LM head gets a sliced (strided) hidden state; a contiguous copy keeps it one matmul on CPU
        self._contiguous = {spec.module_name("lm_head"): lambda h: h.contiguous()}

    @property
    def d_ff(self) -> int:
        """Intermediate neurons per layer (the output projection's input size)."""
        return linear_weight(self.spec.module(self.model, "mlp_out", 0)).shape[1]

    @torch.no_grad()
    def top1(self, prompt: str) -> int:
        """The clean model's top-1 next token after `prompt`."""
        x = torch.tensor([prompt_ids(self.tok, prompt)], device=self.device)
        return int(self.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())

    def answer_id(self, target: str) -> int:
        """The answer token: the gold object's first token (the paper's objects are single tokens)."""
        return target_ids(self.tok, target)[0]

    @torch.no_grad()
    def clean(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """Next-token probabilities, the activations w̄ (n_layers, d_ff) at the last position, and the prefix
        key/value cache of positions < T-1 (None without prefix caching or for a one-token prompt)."""
        x = torch.tensor([ids], device=self.device)
        kv = None
        if self.prefix_cache and len(ids) > 1:
            kv = cache_layers(output_cache(self.model(input_ids=x[:, :-1], use_cache=True)))
            x = x[:, -1:]
        with capture(self.model, self.names, inputs=True, outputs=False) as cap:
            logits = self.model(input_ids=x, use_cache=False, logits_to_keep=1,
                                **cache_kwargs(self.model, None if kv is None else new_cache(self.model, kv))).logits
        acts = torch.stack([cap.inputs[n][0, -1] for n in self.names]).float()
        return torch.softmax(logits[0, -1].float(), -1), acts, kv

    def _rows(self, ids: list[int], kv: list | None, n: int, first: int) -> tuple[torch.Tensor, dict, dict]:
        """Inputs, forward kwargs and input edits for `n` rows patched at layers >= `first`.

        With a prefix cache, layers below `first` compute the same clean state for every row, so they run on ONE
        row (their cache entries stay batch 1) and the hidden state is widened to `n` rows as it enters layer
        `first`; without one, the whole prompt runs `n` times (the plain computation)."""
        if kv is None:
            return torch.tensor([ids], device=self.device).expand(n, -1), {}, {}
        cache = new_cache(self.model, [(k, v) if j < first else
                                       (k.expand(n, -1, -1, -1).contiguous(), v.expand(n, -1, -1, -1).contiguous())
                                       for j, (k, v) in enumerate(kv)])
        widen = {self.spec.module_name("layer", first): lambda h: h.expand(n, *h.shape[1:]).contiguous()}
        return torch.tensor([ids[-1:]], device=self.device), cache_kwargs(self.model, cache), widen

    def attribute(self, prompt: str, target: str) -> PromptAttribution:
        """Eq. 3 for every neuron of every layer; chunks of whole layers × m steps share one forward/backward."""
        ids, answer = prompt_ids(self.tok, prompt), self.answer_id(target)
        probs, acts, kv = self.clean(ids)
        m, L = self.steps, self.spec.n_layers
        alphas = torch.arange(1, m + 1, device=self.device, dtype=acts.dtype) / m  # right Riemann sum, k = 1..m
        per_fwd = max(1, self.batch_rows // m)
        scores = torch.zeros_like(acts)
        for c0 in range(0, L, per_fwd):  # contiguous layers: the backward stops at the chunk's lowest layer
            chunk = list(range(c0, min(L, c0 + per_fwd)))
            scaled = {layer: (alphas[:, None] * acts[layer][None]).requires_grad_(True) for layer in chunk}
            edits = {self.names[layer]: _patch_last(scaled[layer], ci * m) for ci, layer in enumerate(chunk)}
            x, kw, widen = self._rows(ids, kv, len(chunk) * m, chunk[0])
            with torch.enable_grad(), edit_inputs(self.model, {**widen, **edits, **self._contiguous}):
                logits = self.model(input_ids=x, use_cache=False, logits_to_keep=1, **kw).logits[:, -1]
                torch.softmax(logits.float(), -1)[:, answer].sum().backward()
            for layer in chunk:
                scores[layer] = acts[layer] * scaled[layer].grad.sum(0) / m
        return PromptAttribution(scores.cpu(), probs[answer].item(), int(probs.argmax()))

    @torch.no_grad()
    def answer_prob(self, prompt: str, target: str, factors: dict[int, tuple[list[int], float]] | None = None) -> float:
        """P(answer token) with chosen neurons' activations at the last position multiplied: {layer: (idx, f)}
        (f = 0 suppresses, f = 2 amplifies, the paper's §4.3 manipulation)."""
        ids, answer = prompt_ids(self.tok, prompt), self.answer_id(target)
        edits = {self.names[layer]: _scale_last(idx, f) for layer, (idx, f) in (factors or {}).items()}
        with edit_inputs(self.model, edits):
            logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False,
                                logits_to_keep=1).logits
        return torch.softmax(logits[0, -1].float(), -1)[answer].item()


def _patch_last(scaled: torch.Tensor, row0: int):
    """Replace the last-position activation of rows row0..row0+m-1 with the m scaled copies."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[row0: row0 + len(scaled), -1] = scaled.to(x.dtype)
        return x
    return fn


def _scale_last(idx: Sequence[int], factor: float):
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[:, -1, list(idx)] *= factor
        return x
    return fn


# ---- coarse neurons, refining, shared neurons (pure functions) ----------------------------------------
def coarse_neurons(scores: torch.Tensor, threshold: float = 0.2) -> set[Neuron]:
    """Neurons whose attribution is ≥ threshold × the maximum over all layers (§3.3); none if the max ≤ 0."""
    top = scores.max()
    if top <= 0:
        return set()
    return {(int(l_), int(i)) for l_, i in torch.nonzero(scores >= threshold * top).tolist()}


@dataclass
class Refined:
    """Neurons kept by the refining step, and the sharing fraction that kept them."""
    neurons: list[Neuron]
    p: float  # the sharing fraction that was used


def refine(coarse: Sequence[set[Neuron]], p: float = 0.7, step: float = 0.05, lo: int = 2, hi: int = 5,
           max_iter: int = 6) -> Refined:
    """Neurons shared by ≥ p of the bag's prompts; p moves by `step` (down if < lo kept, up if > hi) for at most
    `max_iter` rounds (the reference's bound). The first p giving lo..hi wins, else the non-empty result
    closest to that range."""
    counts = Counter(n for c in coarse for n in c)
    best: Refined | None = None
    tested = p
    for _ in range(max_iter):
        tested = p
        kept = sorted(n for n, c in counts.items() if c >= p * len(coarse) - 1e-9)
        if lo <= len(kept) <= hi:
            return Refined(kept, round(p, 4))
        dist = (lo - len(kept)) if len(kept) < lo else (len(kept) - hi)
        if kept and (best is None or dist < _distance(best, lo, hi)):
            best = Refined(kept, round(p, 4))
        p = p - step if len(kept) < lo else p + step
        if not 0 < p <= 1 + 1e-9:
            break
    return best or Refined([], round(tested, 4))


def _distance(r: Refined, lo: int, hi: int) -> int:
    n = len(r.neurons)
    return lo - n if n < lo else max(0, n - hi)


def neuron_counts(fact_neurons: Iterable[Sequence[Neuron]]) -> Counter:
    """How many facts hold each neuron."""
    return Counter(n for ns in fact_neurons for n in set(map(tuple, ns)))


def shared_neurons(fact_neurons: Sequence[Sequence[Neuron]], frac: float = 0.1, min_facts: int = 2) -> set[Neuron]:
    """Neurons held by more than `frac` of the facts (and by at least `min_facts` of them: a neuron one fact
    alone holds is not shared). The update drops these from a fact's neurons, as the reference code does."""
    counts, n = neuron_counts(fact_neurons), len(fact_neurons)
    return {k for k, c in counts.items() if c > frac * n and c >= min_facts}


# ---- per-fact location with an on-disk cache ----------------------------------------------------------
@dataclass
class FactNeurons:
    """A fact's refined knowledge neurons and how they were found."""

    case_id: str
    relation_id: str | None
    neurons: list[Neuron]
    p: float
    prompts: list[str]
    coarse_sizes: list[int]
    p_clean: list[float]
    known: list[bool]  # per prompt: clean top-1 == the answer token
    seconds: float = 0.0  # attribution time spent here (0 when all prompts came from the cache)
    extra: dict = field(default_factory=dict)


def bag_prompts(req: EditRequest, max_prompts: int | None = None) -> list[str]:
    """A fact's bag: its rewrite prompt and its paraphrases (CounterFact has 2), in that order."""
    bag = [req.rewrite] + [p for p in req.paraphrases if p.strip()]
    return bag[:max_prompts] if max_prompts else bag


class NeuronLocator:
    """Attribution (cached on disk per prompt) + refining for facts; shared by the experiment, KN and erase.

    The cache folder is keyed by the exact weights and every setting an attribution depends on; a file is
    one prompt's scores, written atomically, so interrupted runs resume and several runs share the work.
    """

    def __init__(self, attributor: NeuronAttributor, cache_dir: str | Path | None, threshold: float = 0.2,
                 p_start: float = 0.7, p_step: float = 0.05, min_neurons: int = 2, max_neurons: int = 5,
                 refine_iters: int = 6, max_prompts: int | None = None) -> None:
        self.att = attributor
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.threshold, self.p_start, self.p_step = threshold, p_start, p_step
        self.min_neurons, self.max_neurons, self.refine_iters = min_neurons, max_neurons, refine_iters
        self.max_prompts = max_prompts
        self._digest: tuple[tuple[int, ...], str] | None = None
        self.memo: dict[tuple[str, str], FactNeurons] = {}

    def folder(self) -> Path | None:
        """<cache_dir>/<model>/<weights digest>_<settings>; the digest is recomputed only after weights change."""
        if self.cache_dir is None:
            return None
        versions = tuple(p._version for p in self.att.model.parameters())
        if self._digest is None or self._digest[0] != versions:
            self._digest = (versions, weights_digest(self.att.model))
        settings = json.dumps({"steps": self.att.steps, "answer": "first_token", "baseline": "zero",
                               "riemann": "right", "position": "last"}, sort_keys=True)
        key = hashlib.sha256(settings.encode()).hexdigest()[:12]
        return cache_root(self.cache_dir, "knowledge-neuron cache") / self.att.spec.name / f"{self._digest[1]}_{key}"

    def attribution(self, prompt: str, target: str) -> tuple[PromptAttribution, float]:
        """One prompt's attribution (from the cache when present) and the seconds spent computing it."""
        folder = self.folder()
        path = None
        if folder is not None:
            name = hashlib.sha256(json.dumps([prompt, target], ensure_ascii=False).encode()).hexdigest()[:24]
            path = folder / f"{name}.safetensors"
            hit = read_cached_attribution(path)
            if hit is not None:
                return hit, 0.0
        start = time.perf_counter()
        res = self.att.attribute(prompt, target)
        seconds = time.perf_counter() - start
        if path is not None:
            save_cache(path, {"scores": res.scores, "p_clean": torch.tensor(res.p_clean),
                                "top1": torch.tensor(res.top1)})
        return res, seconds

    def locate(self, req: EditRequest) -> FactNeurons:
        """The fact's refined neurons for its gold object (target_true) over its bag of prompts."""
        key = (self.folder().name if self.cache_dir else "", req.case_id)
        if key in self.memo:
            return self.memo[key]
        prompts = bag_prompts(req, self.max_prompts)
        answer = self.att.answer_id(req.target_true)
        coarse, p_clean, known, seconds = [], [], [], 0.0
        for prompt in prompts:
            res, s = self.attribution(prompt, req.target_true)
            coarse.append(coarse_neurons(res.scores, self.threshold))
            p_clean.append(res.p_clean), known.append(res.top1 == answer)
            seconds += s
        r = refine(coarse, self.p_start, self.p_step, self.min_neurons, self.max_neurons, self.refine_iters)
        fact = FactNeurons(req.case_id, req.relation_id, r.neurons, r.p, prompts, [len(c) for c in coarse],
                           p_clean, known, seconds)
        self.memo[key] = fact
        if seconds:
            log.info("located case_id=%s (%s): %d neurons at p=%.2f, coarse per prompt %s, %.1f s", req.case_id,
                     req.relation_id, len(r.neurons), r.p, fact.coarse_sizes, seconds)
        return fact


def read_cached_attribution(path: Path) -> PromptAttribution | None:
    """The one place attribution files are read: a missing, torn or malformed file is a miss (recomputed)."""
    t = read_cache(path, "knowledge-neuron attribution cache")  # digest-checked: damage is a named miss
    if t is None:
        return None
    try:
        return PromptAttribution(t["scores"], float(t["p_clean"]), int(t["top1"]))
    except (KeyError, RuntimeError, ValueError) as e:  # a foreign file: recompute and overwrite it atomically
        log.warning("knowledge-neuron attribution cache: %s lacks a field (%s); recomputing it", path, e)
        return None


def by_layer(neurons: Iterable[Neuron]) -> dict[int, list[int]]:
    """Neuron indices grouped by layer."""
    out: dict[int, list[int]] = {}
    for layer, i in neurons:
        out.setdefault(int(layer), []).append(int(i))
    return out
