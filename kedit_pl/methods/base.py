"""The interface every editing method implements, and the restore contract they share.

A method is a LightningModule holding the model it edits. `edit.py` drives it through
`Trainer.test`: each test batch is a list of `EditRequest`, `test_step` applies them, and the
`EditEvalCallback` measures before/after and restores (single/batch mode) or keeps (sequential).

To add a method: subclass `EditMethod`, implement `edited_parameters` and `compute_edit`
(weights are modified in place; the base class snapshots and restores), add `conf/method/NAME.yaml`
with `_target_` pointing at the class. Learned editors also implement `training_step`/`validation_step`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from abc import abstractmethod
from typing import Any, Callable, Iterator

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from kedit_pl.data.requests import EditRequest
from kedit_pl.distributed import agree_on_parameters, rank_world
from kedit_pl.errors import EditFailed, KEditError
from kedit_pl.eval.scoring import LogitsFn, model_logits
from kedit_pl.models.spec import ModelSpec
from kedit_pl.weights import EditHandle, LastingRoute, snapshot, write_back  # noqa: F401  (re-exported: the restore contract)
from kedit_pl.tokens import prompt_ids, target_ids


def max_positions(model: nn.Module | None) -> int | None:
    """The longest input the model's position embeddings cover (GPT-2's n_positions, Llama's
    max_position_embeddings); None when its config does not say."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx", "max_sequence_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def request_texts(req: EditRequest):
    """(field, prompt, targets) for every prompt that editing or evaluating `req` feeds the model."""
    both = (req.target_new, req.target_true)
    yield "prompt", req.rewrite, both
    if req.alternative_subject:
        yield "alternative_subject", req.prompt.format(req.alternative_subject), both
    for fld, prompts in (("paraphrases", req.paraphrases), ("neighborhood", req.neighborhood),
                         ("distracting_neighborhood", req.distracting_neighborhood),
                         ("generation_prompts", req.generation_prompts)):
        for p in prompts:
            yield fld, p, both if fld != "generation_prompts" else ()
    if req.loc:
        yield "loc", req.loc, (req.loc_ans or "",)
    for question, answer in req.portability:
        yield "portability", question, (answer,)


class EditMethod(L.LightningModule):
    """Base class: `apply(requests) -> EditHandle`, `restore(handle)`, optional training (implements
    `kedit_pl.weights.EditMethodProtocol`)."""

    #: True for learned editors (MEND, KE, SERAC) that need `train.py` before they can edit. They also implement
    #: `load_editor(path)` (a train.py checkpoint or an exported editor) and `export(folder)`; train.py loads
    #: the best validated checkpoint and exports it.
    trainable: bool = False
    #: True for methods that can share one batch among DDP ranks: each rank does its part of the work inside the
    #: batch (MEMIT: its share of the z vectors, all-gathered through the strategy) and every rank ends with the same
    #: edited model. edit.py then gives every rank every batch and sets `shared_batches`; otherwise whole batches
    #: are spread over the ranks.
    can_share_batches: bool = False
    #: False for methods whose state between sequential batches is not tensors (SERAC's memory of edit texts):
    #: edit.resume then refuses to continue their sequential runs (kedit_pl/sequential_state.py)
    sequential_resumable: bool = True
    #: True for a routing method whose routes (`logits_fn().prefixes`: a model and the ids it continues) stay valid
    #: after `restore` because the models routed to never change (IKE, SERAC): see `lasting_routes`
    fixed_routes: bool = False

    def __init__(self, model: nn.Module | None = None, tokenizer: PreTrainedTokenizerBase | None = None,
                 spec: ModelSpec | None = None) -> None:
        super().__init__()
        self.model = model
        self.tok = tokenizer
        self.spec = spec
        self.last_handle: EditHandle | None = None
        self.shared_batches = False  # set by edit.py under DDP for methods that `can_share_batches`
        self._low_rank: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        if model is not None:
            for p in model.parameters():
                p.requires_grad_(False)

    # --- what subclasses implement -------------------------------------------------------------
    @abstractmethod
    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        """Names of the parameters `compute_edit` may modify (snapshotted before it runs)."""

    @abstractmethod
    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        """Modify the model's weights in place to make the edits; return diagnostics for logging."""

    def request_problem(self, req: EditRequest) -> str | None:
        """Why this method cannot edit `req` faithfully (None: it can). `edit.py` asks this of every record
        before the first edit, so a bad record is reported (or skipped) up front instead of failing mid-run."""
        try:
            req.validate()
        except KEditError as e:
            return str(e)
        return self._too_long(req)

    def context_tokens(self) -> int:
        """Tokens the method puts before a prompt while editing (ROME's context templates); 0 by default."""
        return 0

    def _too_long(self, req: EditRequest) -> str | None:
        """A prompt (+ its longest target, + the method's context prefix) longer than the model's positions."""
        limit = max_positions(self.model)
        if limit is None or self.tok is None:
            return None
        for fld, prompt, targets in request_texts(req):
            margin = self.context_tokens() if fld == "prompt" else 0  # the edited prompt gets the context prefix
            n = len(prompt_ids(self.tok, prompt)) + max((len(target_ids(self.tok, t)) for t in targets if t.strip()),
                                                        default=0) + margin
            if n > limit:
                return (f"record case_id={req.case_id}: field '{fld}' needs {n} tokens (prompt + target"
                        f"{f' + {margin} of context' if margin else ''}), more than the model's {limit} positions: "
                        f"{prompt[:60]!r}...")
        return None

    # --- the shared contract --------------------------------------------------------------------
    def apply(self, requests: list[EditRequest]) -> EditHandle:
        """Apply the edits. On any failure the model is restored before the error propagates."""
        names = self.edited_parameters(requests)
        originals = snapshot(self.model, names)
        self._low_rank = {}
        start = time.perf_counter()
        with self.editing(rollback=lambda: write_back(self.model, originals)):
            with torch.enable_grad():
                info = self.compute_edit(requests)
            if self.shared_batches and self._trainer is not None:  # every rank must now hold the same edit
                agree_on_parameters(self.trainer.strategy, self.model, names)
            params = dict(self.model.named_parameters())
            for n in names:
                if not torch.isfinite(params[n]).all():
                    raise EditFailed(f"{type(self).__name__}: parameter {n} became non-finite; edit rejected")
        return EditHandle(originals, info or {}, time.perf_counter() - start, len(requests), low_rank=self._low_rank)

    @contextmanager
    def editing(self, rollback: Callable[[], None]) -> Iterator[None]:
        """The model in eval mode while an edit runs; on any failure `rollback()` puts back what the edit changed
        (weights, a memory) before the error propagates; the training mode is restored either way."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        except BaseException:
            rollback()
            raise
        finally:
            self.model.train(was_training)

    def record_low_rank(self, module_name: str, left: torch.Tensor, right: torch.Tensor) -> None:
        """Note that `compute_edit` just added `(left @ right)` ((out, r) @ (r, in), float64) to the weight of
        `module_name` in (out, in) orientation; stored in the parameter's own orientation (GPT-2's Conv1D: (in, out))."""
        module = self.model.get_submodule(module_name)
        if type(module).__name__ == "Conv1D":
            left, right = right.T, left.T
        self._low_rank.setdefault(f"{module_name}.weight", []).append((left.detach().cpu(), right.detach().cpu()))

    def restore(self, handle: EditHandle) -> None:
        """Undo an edit: every touched weight returns to its exact original bits."""
        write_back(self.model, handle.originals)

    def sequential_state(self) -> dict[str, torch.Tensor]:
        """What the method carries from one sequential batch to the next besides the weights (AlphaEdit: the
        accumulated K_pK_pᵀ). Saved after every batch so that an interrupted run resumes exactly; default none."""
        return {}

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what `sequential_state` returned (a resumed sequential run)."""
        if state:
            raise EditFailed(f"{type(self).__name__} keeps no sequential state, but was given {sorted(state)}")

    def ranks(self) -> tuple[int, int]:
        """(rank, world size) this method shares its batches with; (0, 1) unless `shared_batches` under DDP."""
        return rank_world(self._trainer) if self.shared_batches else (0, 1)

    def logits_fn(self) -> LogitsFn:
        """How evaluation gets logits. Routing methods (SERAC) override this; weight editors don't."""
        return model_logits(self.model)

    def serves_own_logits(self) -> bool:
        """True when this method overrides `logits_fn` (routes its logits, as SERAC does)."""
        return type(self).logits_fn is not EditMethod.logits_fn

    def lasting_routes(self, rows: list[list[int]]) -> list[LastingRoute] | None:
        """Per prompt (token ids), what the edited system continues it on, in a form that outlives `restore`, so
        that evaluation can generate for many records at once after their edits were undone
        (kedit_pl/eval/row_states.py; the weights an edit wrote are carried beside). A weight editor: the model
        and the prompt; a method with `fixed_routes`: its prefixes (IKE, SERAC); other routing methods: None,
        unless they override this (GRACE)."""
        if not self.serves_own_logits():
            return [LastingRoute(self.model, list(r)) for r in rows]
        prefixes = getattr(self.logits_fn(), "prefixes", None)
        if not self.fixed_routes or prefixes is None:
            return None
        return [LastingRoute(model, ids) for model, ids in prefixes(rows)]

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        """Batches are lists of text requests; tensors are made (on the right device) where needed."""
        return batch

    def test_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self.last_handle = self.apply(batch)

    def configure_optimizers(self):  # editors that do not train have nothing to optimize
        return None


class MemoryEditMethod(EditMethod):
    """A method that keeps a memory beside the frozen model instead of writing weights (IKE, GRACE).

    The memory is a dict of tensors whose first axis is its entries (rows), so that one contract serves restore,
    sequential resume and saved edits: `apply` keeps the memory as it was in the handle, `restore` puts it back
    (bit-exact), `sequential_state` is the memory, and a saved edit stores the rows the edit added or changed
    (`kedit_pl/memory_patch.py`). Subclasses implement `remember` (add the edits to the memory), `memory_state`
    and `load_memory_state`; they serve what the memory says through the model (hooks) or `logits_fn`.
    """

    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return []  # the base model's weights are never modified

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} edits its memory; see MemoryEditMethod.apply")

    @abstractmethod
    def remember(self, requests: list[EditRequest]) -> dict[str, Any]:
        """Add the edits to the memory; return diagnostics for logging."""

    @abstractmethod
    def memory_state(self) -> dict[str, torch.Tensor]:
        """The whole memory as tensors sharing their first axis (one row per entry); fresh tensors, not views."""

    @abstractmethod
    def load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the memory with `state` (as `memory_state` returned it)."""

    def apply(self, requests: list[EditRequest]) -> EditHandle:
        """Add the edits to the memory; on any failure the memory is put back before the error propagates."""
        before = self.memory_state()
        start = time.perf_counter()
        with self.editing(rollback=lambda: self.load_memory_state(before)):
            info = self.remember(requests)
        return EditHandle(info=info or {}, seconds=time.perf_counter() - start, n_requests=len(requests),
                          method_state=before)

    def restore(self, handle: EditHandle) -> None:
        """The memory as it was before the edit, bit-exactly (weights were never touched)."""
        self.load_memory_state(handle.method_state)

    def sequential_state(self) -> dict[str, torch.Tensor]:
        return self.memory_state()

    def load_sequential_state(self, state: dict[str, torch.Tensor]) -> None:
        self.load_memory_state(state)
