"""The Python API: edit a model from a notebook or script, with the same Hydra config as edit.py.

    from kedit_pl import Editor
    ed = Editor(method="rome", model="smollm2_135m")            # keyword overrides: method__layer=6 -> method.layer=6
    edit = ed.edit(subject="Danielle Darrieux", prompt="The mother tongue of {} is", target_new="English")
    ed.generate("Danielle Darrieux's mother tongue is")
    edit.save("patches/darrieux")                               # a patch (python -m kedit_pl.patch apply ...)
    edit.revert()                                               # bit-exact
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import lightning as L
import torch

from kedit_pl.config import CONF_DIR, compose
from kedit_pl.data.requests import EditRequest, normalize_target
from kedit_pl.errors import ConfigError, InvalidRecord
from kedit_pl.eval.metrics import summarize
from kedit_pl.eval.scoring import score_requests
from kedit_pl.eval.generate import greedy_generate
from kedit_pl.memory_patch import change_memory, is_memory_patch, make_memory_patch
from kedit_pl.methods.base import EditHandle, EditMethod, MemoryEditMethod
from kedit_pl.patch import Patch, PatchError, apply_patch, edit_meta, load_patch, make_patch, revert_patch, \
    save_model, save_patch, tensor_digest

RequestLike = EditRequest | Mapping[str, Any]



def first_phrase(text: str) -> str:
    """The answer part of a continuation: up to the first sentence mark or line break ("French, and ..." -> "French")."""
    for stop in ("\n", ".", ",", ";", "!", "?", " and ", " but "):
        text = text.split(stop)[0]
    return text.strip()


class AppliedEdit:
    """An edit that is live on the Editor's model: `revert()` undoes it exactly, `save(stem)` writes its patch."""

    def __init__(self, editor: "Editor", requests: list[EditRequest], patch: Patch,
                 handle: EditHandle | None = None) -> None:
        self.editor, self.requests, self.patch, self.handle = editor, requests, patch, handle
        self.reverted = False

    @property
    def info(self) -> dict[str, Any]:
        """Diagnostics the method reported for this edit (empty if it reported none)."""
        return self.handle.info if self.handle else {}

    @property
    def seconds(self) -> float:
        """Seconds the edit took."""
        return self.handle.seconds if self.handle else 0.0

    def revert(self) -> None:
        """Restore the weights this edit changed, bit-exactly. Later edits to the same weights must be reverted first."""
        if self.reverted:
            raise PatchError("this edit was already reverted")
        if is_memory_patch(self.patch):  # a memory method: its memory goes back (checked like weights)
            self.editor._change_memory(self.patch, forward=False)
        elif self._in_memory():
            self.editor.method.restore(self.handle)  # a memory method (WISE): the edit lives in its memory
        else:
            revert_patch(self.editor.model, self.patch)  # checks the weights are still this edit's result
        self.reverted = True

    def _in_memory(self) -> bool:
        """True for an edit kept in a method's own memory outside patches (WISE's side memories)."""
        return (self.handle is not None and not self.patch.params and not is_memory_patch(self.patch)
                and self.editor.method.serves_own_logits())

    def save(self, stem: str | Path) -> Path:
        """Write the patch as `<stem>.safetensors` + `<stem>.json`; returns the json path. A memory method saves its
        memory instead (WISE: the side memories as `<stem>.safetensors`, for `method.memory_load`)."""
        if self._in_memory():
            if not hasattr(self.editor.method, "save_memory"):
                raise ConfigError(f"method '{self.editor.cfg.method.name}' keeps no weights and no savable memory")
            return self.editor.method.save_memory(f"{stem}.safetensors")
        return save_patch(self.patch, stem)

    def __repr__(self) -> str:
        what = "; ".join(f"{r.rewrite} -> {r.target_new}" for r in self.requests)
        where = "memory" if is_memory_patch(self.patch) else f"{len(self.patch.params)} parameter(s)"
        return f"AppliedEdit({what!r}, {where}{', reverted' if self.reverted else ''})"


class Editor:
    """A loaded model plus an editing method, composed from conf/ as `python edit.py` composes them.

    `method` and `model` name configs (conf/method, conf/model); a `model` that is a folder or a hub id
    (owner/name) loads through `model=hf`. `overrides` are command-line strings ("method.layer=6"); keyword
    arguments are the same with `__` for dots (`method__layer=6`). Edits accumulate on `ed.model` until reverted.
    """

    def __init__(self, method: str = "rome", model: str = "smollm2_135m", overrides: Sequence[str] = (),
                 **kwargs: Any) -> None:
        from kedit_pl.pipeline import build_method

        self.cfg = compose("edit", [*_model_overrides(model), f"method={method}", "paths.output_dir=.",
                                    *overrides, *(f"{k.replace('__', '.')}={_hydra_value(v)}" for k, v in kwargs.items())])
        L.seed_everything(int(self.cfg.seed), verbose=False)
        self.method: EditMethod = build_method(self.cfg)
        self._ids = itertools.count()

    # --- the live model ------------------------------------------------------------------------------
    @property
    def model(self) -> torch.nn.Module:
        """The live Hugging Face model, with every edit still in place applied."""
        return self.method.model

    @property
    def tokenizer(self):
        """The model's tokenizer."""
        return self.method.tok

    def generate(self, prompt: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation of `prompt` by the (edited) model, through the method's logits (SERAC routes)."""
        return greedy_generate(self.method, [prompt], max_new_tokens, stop_at_eos=True)[0]

    # --- editing ------------------------------------------------------------------------------------
    def request(self, subject: str, prompt: str, target_new: str, target_true: str | None = None,
                **fields: Any) -> EditRequest:
        """An EditRequest; without `target_true`, the model's own greedy answer to the rewrite prompt."""
        case_id = str(fields.pop("case_id", f"api-{next(self._ids)}"))
        if target_true is None:
            if prompt.count("{}") != 1:
                raise InvalidRecord(f"record case_id={case_id}: field 'prompt' must contain exactly one '{{}}', "
                                    f"got {prompt!r}")
            target_true = first_phrase(self.generate(prompt.format(subject), 8))
            if not target_true:
                raise InvalidRecord(f"record case_id={case_id}: no target_true given and the model's answer to "
                                    f"{prompt.format(subject)!r} is empty; pass target_true")
        for key in ("paraphrases", "neighborhood"):
            if key in fields:
                fields[key] = tuple(fields[key])
        return EditRequest(case_id=case_id, subject=subject, prompt=prompt, target_true=normalize_target(target_true),
                           target_new=normalize_target(target_new), **fields).validate()

    def _requests(self, requests: Iterable[RequestLike]) -> list[EditRequest]:
        out = []
        for r in requests:
            if isinstance(r, EditRequest):
                out.append(r.validate())
            elif isinstance(r, Mapping):
                out.append(self.request(**dict(r)))
            else:
                raise ConfigError(f"Editor.edit: a request must be an EditRequest or a dict, got {type(r).__name__}")
        return out

    def edit(self, requests: RequestLike | Sequence[RequestLike] | None = None, **fields: Any) -> AppliedEdit:
        """Apply one edit (keyword fields, a dict or an EditRequest) or several at once (a list; batch methods such
        as MEMIT edit them together). Returns the live edit; the model is unchanged if the edit fails."""
        if requests is None:
            reqs = [self.request(**fields)]
        elif fields:
            raise ConfigError("Editor.edit: pass either request objects or keyword fields, not both")
        else:
            reqs = self._requests([requests] if isinstance(requests, (EditRequest, Mapping)) else requests)
        if not reqs:
            raise ConfigError("Editor.edit: no requests")
        for req in reqs:
            problem = self.method.request_problem(req)
            if problem:
                raise InvalidRecord(problem)
        handle = self.method.apply(reqs)
        meta = edit_meta(self.cfg.method.name, self.cfg.model.name, reqs, _container(self.cfg.method), mode="api")
        if isinstance(self.method, MemoryEditMethod):  # a memory method saves its memory rows, not weights
            patch = make_memory_patch(handle.method_state, self.method.memory_state(), meta)
        else:
            patch = make_patch(self.model, handle.originals, handle.low_rank, meta)
        return AppliedEdit(self, reqs, patch, handle)

    def apply_patch(self, path: str | Path) -> AppliedEdit:
        """Apply a saved patch (refused unless the model's weights are the ones it was made on)."""
        patch = load_patch(path)
        if is_memory_patch(patch):
            self._change_memory(patch, forward=True)
        else:
            apply_patch(self.model, patch)
        return AppliedEdit(self, [EditRequest(**r) for r in _requests_of(patch)], patch)

    def _change_memory(self, patch: Patch, forward: bool) -> None:
        """Apply or revert a memory method's saved edit (kedit_pl/memory_patch.py) on this Editor's method."""
        if not isinstance(self.method, MemoryEditMethod) or patch.meta.get("method") != self.cfg.method.name:
            raise PatchError(f"{patch.meta.get('file', 'patch')}: a saved edit of memory method "
                             f"'{patch.meta.get('method')}'; this Editor runs '{self.cfg.method.name}' "
                             f"(use Editor(method='{patch.meta.get('method')}'))")
        self.method.load_memory_state(change_memory(self.method.memory_state(), patch, forward))

    # --- evaluation and saving -----------------------------------------------------------------------
    def score(self, records: Sequence[RequestLike]) -> dict[str, float]:
        """ES/PS/NS (and the rest of eval/metrics.py) of `records` on the current model, in percent."""
        reqs = self._requests(records)
        scores = score_requests(self.method.logits_fn(), self.tokenizer, reqs, int(self.cfg.edit.eval_batch_size),
                                self.method.device)
        return summarize(scores)

    def save_model(self, folder: str | Path, replace: bool = False) -> Path:
        """The current (edited) model as a Hugging Face folder: `AutoModelForCausalLM.from_pretrained(folder)`.
        `folder` must be new or empty; `replace=True` replaces a model folder kedit_pl wrote (nothing else)."""
        if self.method.serves_own_logits():
            raise ConfigError(f"method '{self.cfg.method.name}' routes inputs instead of changing weights; "
                              "its edits are not in the model's weights")
        return save_model(self.model, self.tokenizer, folder, replace=replace, what="Editor.save_model")

    def digest(self) -> str:
        """SHA-256 of every weight (to check two models are bit-identical)."""
        return tensor_digest(sorted(self.model.state_dict().items()))


def _model_overrides(model: str) -> list[str]:
    if (CONF_DIR / "model" / f"{model}.yaml").is_file():
        return [f"model={model}"]
    if Path(model).expanduser().is_dir() or model.count("/") == 1:
        return ["model=hf", f"model.path={model}"]
    names = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
    raise ConfigError(f"Editor: model {model!r} is not a config ({', '.join(names)}), a folder or a hub id")


def _hydra_value(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_hydra_value(x) for x in v) + "]"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def _container(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True)


def _requests_of(patch: Patch) -> list[dict[str, Any]]:
    out = []
    for r in patch.meta.get("requests", []):
        r = dict(r)
        for key in ("paraphrases", "neighborhood"):
            r[key] = tuple(r.get(key) or ())
        out.append(r)
    return out
