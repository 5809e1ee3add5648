"""Causal tracing (ROME, Meng et al. 2022, §2): which hidden states carry a fact.

Three runs per fact (subject s, prompt, object o):
- clean run: P[o];
- corrupted run: Gaussian noise eps ~ N(0, nu), nu = 3 x (std of subject-token embeddings), added to the
  embeddings of every subject token; P*[o] is averaged over `n_samples` noise draws;
- corrupted-with-restoration: like the corrupted run, but one state at (token i, layer l) is set back to
  its clean value; P*_clean h_i^(l) [o]. MLP/attention restore a window of `window` layers centred on l.

Total effect TE = P[o] - P*[o]; indirect effect IE(i, l) = P*_restored[o] - P*[o].

Speed: restoring at token t cannot change positions < t (causal attention), so each restoration batch
reuses the corrupted run's key/value cache for the prefix and only runs tokens t..T-1; restorations
before the subject are no-ops (clean == corrupted there) and are not run (IE = 0 exactly).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from kedit_pl.hooks import OutputEdit, capture, edit_inputs, edit_outputs
from kedit_pl.models.kv_cache import cache_kwargs, cache_layers, new_cache, output_cache
from kedit_pl.models.spec import ModelSpec
from kedit_pl.tokens import prompt_ids, subject_token_range, target_ids

#: trace kind -> ModelSpec template whose output is restored
KIND_TEMPLATE = {"hidden": "layer", "mlp": "mlp", "attn": "attn"}
#: the token groups of the paper's average-effect figure (Fig. 2 / notebook rollup), in order
GROUPS = ("first_subject", "middle_subject", "last_subject", "first_subsequent", "further", "last")


def window_layers(layer: int, n_layers: int, window: int) -> range:
    """Layers restored for a trace centred on `layer`: a run of `window` layers, clipped at the ends (§2)."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return range(max(0, layer - window // 2), min(n_layers, layer + window - window // 2))


@torch.no_grad()
def embedding_std(model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, subjects: Sequence[str]) -> float:
    """Std over all coordinates of the subject tokens' embeddings (the paper's noise scale is 3x this)."""
    embed = spec.module(model, "embed")
    ids = [i for s in subjects for i in tok(" " + s.strip(), add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ValueError("no subject tokens to measure the embedding std on")
    dev = next(model.parameters()).device
    return embed(torch.tensor([ids], device=dev)).float().std().item()


@dataclass
class TraceResult:
    """One fact's trace. `scores[kind][i, l]` = P*_restored[o] for restoring (token i, layer l)."""

    tokens: list[str]
    subject_range: tuple[int, int]
    answer: str
    answer_id: int
    p_clean: float
    p_corrupt: float
    correct_prediction: bool
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    window: int = 10
    seconds: float = 0.0
    case_id: str = ""

    @property
    def total_effect(self) -> float:
        """TE = P[o] - P*[o] (§2)."""
        return self.p_clean - self.p_corrupt

    def indirect_effect(self, kind: str) -> torch.Tensor:
        """IE(i, l) = P*_restored h_i^(l) [o] - P*[o] (§2), shape (tokens, layers)."""
        return self.scores[kind] - self.p_corrupt

    def to_dict(self) -> dict:
        """The result as JSON-ready data."""
        d = {k: getattr(self, k) for k in ("case_id", "tokens", "answer", "answer_id", "p_clean", "p_corrupt",
                                           "correct_prediction", "window", "seconds")}
        d.update(subject_range=list(self.subject_range), total_effect=self.total_effect,
                 scores={k: v.tolist() for k, v in self.scores.items()})
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "TraceResult":
        """Rebuild a result from `to_dict`'s data."""
        keep = {k: d[k] for k in ("case_id", "tokens", "answer", "answer_id", "p_clean", "p_corrupt",
                                  "correct_prediction", "window", "seconds")}
        return cls(subject_range=tuple(d["subject_range"]), scores={k: torch.tensor(v) for k, v in d["scores"].items()},
                   **keep)


def _restorer(clean: torch.Tensor, rows: torch.Tensor | None, positions: Sequence[int], offset: int) -> OutputEdit:
    """Set `out[rows, p - offset]` to the clean state at absolute position p (rows=None: all rows)."""
    sel = slice(None) if rows is None else rows

    def fn(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        for p in positions:
            out[sel, p - offset] = clean[p].to(out.dtype)
        return out
    return fn


def _noiser(noise: torch.Tensor, span: tuple[int, int], offset: int) -> OutputEdit:
    """Add `noise` (rows, subject tokens, hidden) to the subject embeddings; input starts at position `offset`."""
    s, e = span
    a = max(s, offset)

    def fn(out: torch.Tensor) -> torch.Tensor:
        if a >= e:
            return out
        out = out.clone()
        out[:, a - offset: e - offset] += noise[:, a - s: e - s].to(out.dtype)
        return out
    return fn


class CausalTracer:
    """Runs causal traces of one model. `noise_std` is nu (already multiplied, e.g. 3 x embedding std)."""

    def __init__(self, model: nn.Module, tok: PreTrainedTokenizerBase, spec: ModelSpec, noise_std: float,
                 n_samples: int = 10, window: int = 10, batch_rows: int = 512, seed: int = 1) -> None:
        self.model, self.tok, self.spec = model, tok, spec
        self.noise_std, self.n_samples, self.window = float(noise_std), int(n_samples), int(window)
        self.batch_rows, self.seed = int(batch_rows), int(seed)
        self.device = next(model.parameters()).device

    # ---- single runs -------------------------------------------------------------------------
    def names(self, kind: str, layers: Sequence[int]) -> list[str]:
        """Module names whose outputs a `kind` ('hidden' | 'mlp' | 'attn') restoration replaces."""
        return [self.spec.module_name(KIND_TEMPLATE[kind], layer) for layer in layers]

    def restored_layers(self, kind: str, layer: int) -> range:
        """Hidden states are restored one layer at a time; MLP/attention over a window (§2)."""
        return range(layer, layer + 1) if kind == "hidden" else window_layers(layer, self.spec.n_layers, self.window)

    def noise(self, n_tokens: int) -> torch.Tensor:
        """The fact's noise draws, (n_samples, n_tokens, hidden); the same draws serve every restoration."""
        g = torch.Generator().manual_seed(self.seed)
        eps = torch.randn(self.n_samples, n_tokens, self.spec.hidden_size, generator=g)
        return (eps * self.noise_std).to(self.device)

    def _forward(self, ids: torch.Tensor, edits: dict[str, OutputEdit], past: DynamicCache | None = None,
                 use_cache: bool = False):
        """One batched forward with `edits`; logits of the last position only.

        HF slices the last position before lm_head, leaving a non-contiguous (B, 1, H) input for which
        torch's linear falls back to a batched matmul that re-reads the whole vocab matrix per row
        (2.7x slower on SmolLM2, 6x on Gemma 3); making it contiguous keeps it a single matmul.
        """
        contiguous = {self.spec.module_name("lm_head"): lambda h: h.contiguous()}
        with torch.no_grad(), edit_outputs(self.model, edits), edit_inputs(self.model, contiguous):
            return self.model(input_ids=ids, use_cache=use_cache, logits_to_keep=1, **cache_kwargs(self.model, past))

    @torch.no_grad()
    def clean_run(self, ids: list[int], names: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Next-token probabilities of the clean prompt and the clean outputs of the named modules."""
        x = torch.tensor([ids], device=self.device)
        with capture(self.model, names) as cap:
            logits = self.model(input_ids=x, use_cache=False, logits_to_keep=1).logits
        return torch.softmax(logits[0, -1].float(), -1), {n: cap.outputs[n][0] for n in names}

    @torch.no_grad()
    def patched_prob(self, ids: list[int], span: tuple[int, int], answer_id: int,
                     restore: Mapping[str, Sequence[int]] | None = None,
                     clean: Mapping[str, torch.Tensor] | None = None) -> float:
        """P*[o] with the subject corrupted and `restore[module] = positions` set to clean (full forward, no cache)."""
        restore = restore or {}
        if restore and clean is None:
            _, clean = self.clean_run(ids, list(restore))
        noise = self.noise(span[1] - span[0])
        edits = {self.spec.module_name("embed"): _noiser(noise, span, 0)}
        edits.update({n: _restorer(clean[n], None, pos, 0) for n, pos in restore.items()})
        x = torch.tensor([ids], device=self.device).expand(self.n_samples, -1)
        logits = self._forward(x, edits).logits[:, -1].float()
        return torch.softmax(logits, -1)[:, answer_id].mean().item()

    # ---- the batched (token, layer) grid -----------------------------------------------------
    def _corrupted_cache(self, ids: list[int], span: tuple[int, int], noise: torch.Tensor, answer_id: int):
        """P*[o] and the corrupted run's per-layer (keys, values), (n_samples, heads, T, d)."""
        x = torch.tensor([ids], device=self.device).expand(self.n_samples, -1)
        out = self._forward(x, {self.spec.module_name("embed"): _noiser(noise, span, 0)}, use_cache=True)
        p = torch.softmax(out.logits[:, -1].float(), -1)[:, answer_id].mean().item()
        kv = cache_layers(output_cache(out))
        return p, kv

    def _prefix_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], t: int, reps: int) -> DynamicCache | None:
        """A fresh cache holding positions < t, each noise sample repeated `reps` times (sample-major rows)."""
        if t == 0:
            return None
        return new_cache(self.model, [(k[:, :, :t].repeat_interleave(reps, 0), v[:, :, :t].repeat_interleave(reps, 0))
                                      for k, v in kv])

    @torch.no_grad()
    def grid(self, kind: str, ids: list[int], span: tuple[int, int], answer_id: int, noise: torch.Tensor,
             clean: Mapping[str, torch.Tensor], kv, p_corrupt: float) -> torch.Tensor:
        """P*_restored[o] for every (token, layer): (T, L). Many restorations share one forward."""
        T, L, S = len(ids), self.spec.n_layers, self.n_samples
        scores = torch.full((T, L), p_corrupt)
        per_fwd = max(1, self.batch_rows // S)
        embed = self.spec.module_name("embed")
        for t in range(span[0], T):
            for c0 in range(0, L, per_fwd):
                chunk = list(range(c0, min(L, c0 + per_fwd)))
                C = len(chunk)
                config_of_row = torch.arange(S * C, device=self.device) % C  # rows are sample-major
                by_module: dict[str, list[int]] = {}
                for ci, layer in enumerate(chunk):
                    for n in self.names(kind, self.restored_layers(kind, layer)):
                        by_module.setdefault(n, []).append(ci)
                edits = {embed: _noiser(noise.repeat_interleave(C, 0), span, t)}
                for n, cfgs in by_module.items():
                    rows = torch.isin(config_of_row, torch.tensor(cfgs, device=self.device))
                    edits[n] = _restorer(clean[n], rows, [t], t)
                x = torch.tensor([ids[t:]], device=self.device).expand(S * C, -1)
                logits = self._forward(x, edits, past=self._prefix_cache(kv, t, C)).logits[:, -1].float()
                p = torch.softmax(logits, -1)[:, answer_id].view(S, C).mean(0)
                scores[t, c0: c0 + C] = p.cpu()
        return scores

    def trace(self, template: str, subject: str, target: str | None = None,
              kinds: Sequence[str] = ("hidden", "mlp", "attn"), require_correct: bool = False,
              case_id: str = "") -> TraceResult | None:
        """Trace one fact. o = first token of `target` if given, else the clean top-1 prediction.

        With `require_correct`, returns None (cheaply, after the clean run) unless the clean top-1 token is
        the first token of `target` (the paper traces facts the model knows).
        """
        start = time.perf_counter()
        text, s, e = subject_token_range(self.tok, template, subject)
        ids = prompt_ids(self.tok, text)
        probs, clean = self.clean_run(ids, [n for k in kinds for n in self.names(k, range(self.spec.n_layers))])
        top = int(probs.argmax())
        tgt = target_ids(self.tok, target)[0] if target else None
        correct = tgt is not None and top == tgt
        if require_correct and not correct:
            return None
        answer_id = tgt if tgt is not None else top
        noise = self.noise(e - s)
        p_corrupt, kv = self._corrupted_cache(ids, (s, e), noise, answer_id)
        scores = {k: self.grid(k, ids, (s, e), answer_id, noise, clean, kv, p_corrupt) for k in kinds}
        return TraceResult(tokens=[self.tok.decode([i]) for i in ids], subject_range=(s, e),
                           answer=self.tok.decode([answer_id]), answer_id=answer_id,
                           p_clean=probs[answer_id].item(), p_corrupt=p_corrupt, correct_prediction=correct,
                           scores=scores, window=self.window, seconds=time.perf_counter() - start, case_id=case_id)


# ---- averages over facts (the paper's average indirect effect figures) ----------------------------
def token_groups(n_tokens: int, subject_range: tuple[int, int]) -> dict[str, list[int]]:
    """Token positions of each group of the paper's average figure; middle/further may be empty."""
    s, e = subject_range
    last = n_tokens - 1
    return {"first_subject": [s], "middle_subject": list(range(s + 1, e - 1)), "last_subject": [e - 1],
            "first_subsequent": [e] if e <= last else [], "further": list(range(e + 1, last)), "last": [last]}


def average_effects(results: Sequence[TraceResult], kinds: Sequence[str]) -> dict:
    """Average IE per token group and layer: {kind: {group: {mean, std, n}}} plus average TE, P, P*."""
    if not results:
        raise ValueError("no traces to average")
    out: dict = {"n_facts": len(results),
                 "p_clean": sum(r.p_clean for r in results) / len(results),
                 "p_corrupt": sum(r.p_corrupt for r in results) / len(results)}
    out["total_effect"] = out["p_clean"] - out["p_corrupt"]
    for kind in kinds:
        rows: dict[str, list[torch.Tensor]] = {g: [] for g in GROUPS}
        for r in results:
            ie = r.indirect_effect(kind)
            for g, pos in token_groups(len(r.tokens), r.subject_range).items():
                rows[g].extend(ie[p] for p in pos)
        out[kind] = {}
        for g, vs in rows.items():
            m = torch.stack(vs) if vs else torch.full((1, len(results[0].scores[kind][0])), float("nan"))
            out[kind][g] = {"mean": m.mean(0), "std": m.std(0, unbiased=False), "n": len(vs)}
    return out


def suggest_edit_layers(mlp_ie: torch.Tensor, early_frac: float = 2 / 3, rel: float = 0.8,
                        max_span: int = 6) -> dict:
    """ROME layer and MEMIT range from the average MLP IE at the last subject token, by layer.

    ROME layer: the peak within the first `early_frac` of layers (the paper's early-middle MLP site).
    MEMIT range: the contiguous layers around that peak whose IE is >= `rel` x peak, at most `max_span`
    layers, ending at the peak when it must be cut (MEMIT's critical MLP path precedes the peak).
    """
    L = len(mlp_ie)
    early = max(1, int(round(L * early_frac)))
    peak = int(torch.argmax(mlp_ie[:early]))
    thr = rel * mlp_ie[peak].item()
    lo, hi = peak, peak
    while lo > 0 and mlp_ie[lo - 1] >= thr:
        lo -= 1
    while hi < L - 1 and mlp_ie[hi + 1] >= thr:
        hi += 1
    if hi - lo + 1 > max_span:
        lo = max(lo, peak - max_span + 1)
        hi = min(hi, lo + max_span - 1)
    return {"rome_layer": peak, "memit_layers": list(range(lo, hi + 1)), "global_peak": int(torch.argmax(mlp_ie)),
            "peak_ie": mlp_ie[peak].item(), "threshold": thr}
