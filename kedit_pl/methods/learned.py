"""What the learned weight editors (MEND, KE) share: gradients of the edit, independent edits per batch row,
the locality loss, and editor-only checkpoints with their checks.

An editor maps the fine-tuning gradient of an edit to a weight update ΔW of a few chosen matrices. Each method
implements `request_deltas` (one ΔW per request) and its training objective (`losses`); this class applies
the ΔW in place for `edit.py` (a batch edit adds the requests' ΔW), and in training runs every request of a
batch as its own edit in one forward pass (`edited_logits`), as at test time (single-edit protocol).
Checkpoints hold the editor only, never the frozen base model, and name their method and model, so a wrong
one is a one-line error.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.hooks import capture, edit_outputs, linear_deltas
from kedit_pl.io import load_torch_checkpoint, read_tensors, save_tensors, write_json
from kedit_pl.methods.base import EditMethod
from kedit_pl.models.spec import linear_weight
from kedit_pl.tokens import TargetBatch, encode_targets, label_logprobs, prompt_ids

log = logging.getLogger(__name__)

WEIGHTS_FILE, CONFIG_FILE, FORMAT = "editor.safetensors", "editor.json", 1
#: methods whose trained editors a checkpoint may hold (the metadata key is the method name)
TITLES = {"mend": "MEND", "ke": "KE", "serac": "SERAC", "malmen": "MALMEN"}
SERAC_CONFIG = "config.json"  # a SERAC export folder (methods/serac/checkpoint.py)

#: per edited parameter: u (B, T, d_in) and δ (B, T, d_out), the layer input and the loss gradient at its output
Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


class LearnedEditor(EditMethod):
    """Base of MEND and KE: `train.py method=NAME` trains the editor, `edit.py method=NAME method.checkpoint=PATH`
    uses it. Subclasses set KIND, build `self.editor` (an nn.Module with a `cfg` that has to_dict/from_dict/arch)
    through `_init_editor`, and implement `request_deltas`, `losses` and `configure_optimizers`."""

    trainable = True
    KIND = ""
    CONFIG: Any = None  # the editor's config class

    def __init__(self, model=None, tokenizer=None, spec=None, *, layers: Sequence[int] = (),
                 modules: Sequence[str] = ("mlp_in", "mlp_out"), loc_loss: str = "kl", loc_prompts: int = 1) -> None:
        super().__init__(model, tokenizer, spec)
        if not layers:
            raise ConfigError(f"method.layers: {self.KIND} needs at least one layer to edit, got {list(layers)}")
        if loc_loss not in ("kl", "nll") or loc_prompts < 1:
            raise ConfigError(f"method.loc_loss/loc_prompts: need 'kl' or 'nll' and >= 1 prompt; got "
                              f"loc_loss={loc_loss!r}, loc_prompts={loc_prompts}")
        self.layers, self.module_kinds = list(layers), list(modules)
        self.loc_loss, self.loc_prompts = loc_loss, int(loc_prompts)
        #: True once the editor is trained (fit started) or loaded; editing refuses an untrained editor.
        self.ready = False

    def _params(self) -> tuple[tuple[str, int, int], ...]:
        """(parameter name, d_out, d_in) of every edited matrix, from method.layers x method.modules."""
        return tuple((self.spec.weight_name(m, layer), *self._shape(self.spec.module_name(m, layer)))
                     for layer in self.layers for m in self.module_kinds)

    def _init_editor(self, cfg: Any, checkpoint: str | None) -> None:
        """Build `self.editor` from `cfg`, or from the checkpoint's own config and weights."""
        state = None
        if checkpoint:
            cfg, state = self._read_checkpoint(checkpoint, cfg)
        self.editor = self.build_editor(cfg)
        if state is not None:
            try:
                self.editor.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(f"method.checkpoint: {checkpoint} does not fit its own editor config "
                                  f"({str(e).splitlines()[0]})") from None
            self.ready = True
            log.info("loaded %s editor from %s", TITLES[self.KIND], checkpoint)

    def build_editor(self, cfg: Any) -> nn.Module:
        """The editor network for `cfg` (each learned method builds its own)."""
        raise NotImplementedError

    def request_deltas(self, requests: list[EditRequest], factors: Factors, mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """One update per request: parameter name -> (len(requests), d_out, d_in), in (out, in) orientation."""
        raise NotImplementedError

    # --- architecture ----------------------------------------------------------------------------
    def _shape(self, module_name: str) -> tuple[int, int]:
        """(d_out, d_in) of a projection, whatever its storage orientation."""
        w = self.model.get_submodule(module_name).weight
        if w.dim() != 2:
            raise ConfigError(f"method.modules: {module_name} has a {w.dim()}-D weight; {TITLES[self.KIND]} "
                              f"edits 2-D projections")
        return tuple(linear_weight(self.model.get_submodule(module_name)).shape)

    @staticmethod
    def _module(param: str) -> str:
        return param.removesuffix(".weight")

    def _stored(self, param: str, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) update in the parameter's own layout (GPT-2's Conv1D stores the transpose)."""
        module = self.model.get_submodule(self._module(param))
        return delta if linear_weight(module) is module.weight else delta.T

    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return [name for name, _, _ in self.editor.cfg.params]

    # --- the gradient of the edit and the update ---------------------------------------------------
    def gradient_factors(self, requests: list[EditRequest]) -> tuple[torch.Tensor, Factors, torch.Tensor]:
        """Per-request NLL of target_new after the rewrite, each edited weight's (u, δ), and the token mask.

        The loss is Σ_requests (mean token NLL), so row b of δ is the gradient of request b's own loss, and
        request b's fine-tuning gradient is ∇W_b = Σ_t δ_bt u_btᵀ (zero at padding, where δ is zero).
        """
        batch = self._encode([r.rewrite for r in requests], [r.target_new for r in requests])
        modules = [self._module(p) for p in self.edited_parameters(requests)]
        track = {m: (lambda out: out if out.requires_grad else out.requires_grad_()) for m in modules}
        with torch.enable_grad(), edit_outputs(self.model, track), \
                capture(self.model, modules, inputs=True, outputs=True, detach=False) as cap:
            nll = request_nll(self._logits(batch), batch)
            deltas = torch.autograd.grad(nll.sum(), [cap.outputs[m] for m in modules])
        factors = {p: (cap.inputs[m].detach(), d) for p, m, d in zip(self.edited_parameters(requests), modules, deltas)}
        return nll.detach(), factors, batch.attention_mask.bool()

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        """Add the requests' updates (summed: a batch edit) to the weights in place."""
        if not self.ready:
            raise ConfigError(no_checkpoint(self.KIND))
        was_training = self.editor.training
        self.editor.eval()  # editing never updates training-time state (MEND's normalization statistics)
        try:
            nll, factors, mask = self.gradient_factors(requests)
            with torch.no_grad():
                deltas = self.request_deltas(requests, factors, mask)
                named = dict(self.model.named_parameters())
                for n, d in deltas.items():
                    named[n].add_(self._stored(n, d.sum(0)).to(named[n].dtype))
        finally:
            self.editor.train(was_training)
        return {"rewrite_nll_pre": float(nll.mean()),
                "update_norm": float(sum(d.sum(0).norm() for d in deltas.values()))}

    # --- training pieces -----------------------------------------------------------------------------
    def _encode(self, prompts: list[str], targets: list[str]) -> TargetBatch:
        return encode_targets(self.tok, prompts, targets).to(self.device)

    def _logits(self, batch: TargetBatch) -> torch.Tensor:
        return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def edited_logits(self, batch: TargetBatch, deltas: dict[str, torch.Tensor], owner: list[int]) -> torch.Tensor:
        """Logits with row b edited by its request's update (index owner[b] into each (E, d_out, d_in) ΔW)."""
        mods = {self._module(n): d for n, d in deltas.items()}
        with linear_deltas(self.model, mods, torch.tensor(owner, device=self.device)):
            return self._logits(batch)

    def edited_nll(self, rows: list[tuple[int, str, str]], deltas: dict[str, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean token NLL of each (owner, prompt, target) row under its owner's edit, in row order, and the
        token accuracy over all rows. Rows of similar length share a forward pass (CounterFact's paraphrases
        are 2-3x longer than its rewrites; one right-padded batch would pad the short rows to them)."""
        lengths = [len(prompt_ids(self.tok, p)) for _, p, _ in rows]
        order = sorted(range(len(rows)), key=lengths.__getitem__)
        groups = [[order[0]]]
        for i in order[1:]:
            (groups[-1].append(i) if lengths[i] <= 1.5 * lengths[groups[-1][0]] else groups.append([i]))
        nll = [None] * len(rows)
        correct = total = 0
        for g in groups:
            batch = self._encode([rows[i][1] for i in g], [rows[i][2] for i in g])
            post = self.edited_logits(batch, deltas, [rows[i][0] for i in g])
            for i, v in zip(g, request_nll(post, batch)):
                nll[i] = v
            mask = batch.target_mask
            correct, total = correct + ((post.argmax(-1) == batch.labels) & mask).sum(), total + mask.sum()
        return torch.stack(nll), (correct.float() / total).detach()

    def locality_loss(self, requests: list[EditRequest], deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each request's locality prompts under its own edit: KL(p_θ ‖ p_θ̃) at the answer positions (MEND's
        L_loc, KE's KL constraint), or (loc_loss=nll) the NLL of the unedited answer. Zero without prompts."""
        rows = [(i, p, a) for i, r in enumerate(requests) for p, a in loc_pairs(r, self.loc_prompts)]
        if not rows:
            return torch.zeros((), device=self.device)
        if self.loc_loss == "nll":
            return self.edited_nll(rows, deltas)[0].mean()
        batch = self._encode([p for _, p, _ in rows], [a for _, _, a in rows])
        post = self.edited_logits(batch, deltas, [i for i, _, _ in rows])
        with torch.no_grad():
            pre = self._logits(batch)
        return kl_loc(pre, post, batch.target_mask)

    def train(self, mode: bool = True) -> "LearnedEditor":
        """Only the editor switches modes; the frozen base model always runs in eval mode."""
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    def on_fit_start(self) -> None:
        self.ready = True

    def setup(self, stage: str) -> None:
        if stage == "test" and not self.ready:  # edit.py: fail before any scoring work
            raise ConfigError(no_checkpoint(self.KIND))

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], n: int) -> None:
        for k, v in losses.items():
            self.log(f"{stage}/{k}", v.detach(), prog_bar=k in ("loss", "edit_loss"), batch_size=n)

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self._log_losses("train", losses, len(batch))
        return losses["loss"]

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self._log_losses("val", self.losses(batch), len(batch))

    def losses(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """Training losses of one batch of edits (with `loss`, the one to minimize)."""
        raise NotImplementedError

    # --- checkpoints: the editor only, never the frozen base model ------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.editor.state_dict(destination=destination, prefix=prefix + "editor.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        editor = {k.removeprefix("editor."): v for k, v in state_dict.items() if k.startswith("editor.")}
        other = [k for k in state_dict if not k.startswith("editor.")]
        if other and strict:
            raise ConfigError(f"{TITLES[self.KIND]} checkpoint: unexpected entries {other[:3]}; it should hold only "
                              f"editor.* weights")
        return self.editor.load_state_dict(editor, strict=strict, assign=assign)

    def editor_meta(self) -> dict[str, Any]:
        """What an exported editor records about itself: format, method, model, layers, modules, network config."""
        return {"format": FORMAT, "method": self.KIND, "model": self.spec.name, "layers": self.layers,
                "modules": self.module_kinds, "editor": self.editor.cfg.to_dict()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.KIND] = self.editor_meta()

    def export(self, directory: str | Path) -> Path:
        """Write `editor.safetensors` (weights and state) and `editor.json` (its config)."""
        directory = Path(directory)
        meta = self.editor_meta()
        save_tensors(directory / WEIGHTS_FILE, self.editor.state_dict(), metadata={self.KIND: json.dumps(meta)})
        write_json(directory / CONFIG_FILE, meta)
        return directory

    def load_editor(self, path: str | Path) -> None:
        """Load editor weights from an exported editor or a train.py checkpoint (same architecture)."""
        _, state = self._read_checkpoint(str(path), self.editor.cfg)
        self.editor.load_state_dict(state)
        self.ready = True

    def _read_checkpoint(self, path: str, wanted: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        """The editor's config and state from `path`, checked against the method and the loaded model."""
        meta, state = read_checkpoint(path, self.KIND)
        if meta.get("model") != self.spec.name:
            raise ConfigError(f"method.checkpoint: {path} is a {TITLES[self.KIND]} editor trained for model "
                              f"'{meta.get('model')}', not '{self.spec.name}'; pass model={meta.get('model')} or "
                              f"train one for this model")
        cfg = self.CONFIG.from_dict(meta["editor"])
        named = dict(self.model.named_parameters())
        for pname, d_out, d_in in cfg.params:
            if pname not in named or self._shape(self._module(pname)) != (d_out, d_in):
                raise ConfigError(f"method.checkpoint: {path} edits {pname} ({d_out}x{d_in}), which this model "
                                  f"does not have with that shape")
        if cfg.arch() != wanted.arch():
            log.warning("method.checkpoint: using the checkpoint's editor (layers %s, modules %s, %s), not the "
                        "method config's", meta.get("layers"), meta.get("modules"), cfg.arch()[1:])
            self.layers, self.module_kinds = list(meta["layers"]), list(meta["modules"])
        return cfg, state


def no_checkpoint(kind: str) -> str:
    """The one-line error for a learned method run without a trained editor, with the command that trains one."""
    return (f"method.checkpoint: {TITLES[kind]} edits with a trained editor network and none was given (it never "
            f"falls back to an untrained one). Train one: `python train.py method={kind} dataset=zsre`, then pass "
            f"method.checkpoint=<train run dir>/editor (an exported dir, its {WEIGHTS_FILE}, or a Lightning .ckpt "
            f"from <run dir>/checkpoints)")


def read_checkpoint(path: str | Path, kind: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A `kind` editor's metadata and tensors, loaded without pickle (safetensors, or torch.load(weights_only=True)).
    A checkpoint of another method is a one-line error naming both."""
    p = Path(path).expanduser()
    if p.is_dir() and not (p / WEIGHTS_FILE).is_file() and (p / SERAC_CONFIG).is_file():
        _wrong(p, "serac", kind)
    p = p / WEIGHTS_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"method.checkpoint: {p} does not exist; pass an exported {TITLES[kind]} editor dir, its "
                          f"{WEIGHTS_FILE}, or a Lightning .ckpt")
    try:
        if p.suffix == ".safetensors":
            tensors, meta = read_tensors(p, "method.checkpoint")
            return _checked({k: json.loads(v) for k, v in meta.items() if k in TITLES}, p, kind), tensors
        if p.suffix == ".ckpt":
            ckpt = load_torch_checkpoint(p, "method.checkpoint")
            state = {k.removeprefix("editor."): v for k, v in ckpt["state_dict"].items() if k.startswith("editor.")}
            return _checked({k: ckpt[k] for k in TITLES if k in ckpt}, p, kind), state
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        raise ConfigError(f"method.checkpoint: {p} is not a {TITLES[kind]} editor checkpoint "
                          f"({type(e).__name__}: {e})") from None
    raise ConfigError(f"method.checkpoint: {p} must be a directory, a .safetensors or a .ckpt file")


def _wrong(path: Path, found: str, kind: str) -> None:
    raise ConfigError(f"method.checkpoint: {path} holds a {TITLES[found]} editor, but method={kind} needs a "
                      f"{TITLES[kind]} editor (train one with `python train.py method={kind}`)")


def _checked(metas: dict[str, Any], path: Path, kind: str) -> dict[str, Any]:
    """The `kind` metadata among a checkpoint's, if it describes an editor this code can read."""
    if kind not in metas and metas:
        _wrong(path, next(iter(metas)), kind)
    meta = metas.get(kind)
    ok = isinstance(meta, dict) and meta.get("method") == kind and meta.get("format") == FORMAT
    if not ok or "editor" not in meta:
        raise ConfigError(f"method.checkpoint: {path} has no {TITLES[kind]} editor metadata (format {FORMAT})")
    return meta


# --- loss pieces -------------------------------------------------------------------------------------
def rephrase(req: EditRequest) -> str:
    """The equivalence input of the edit loss: the first paraphrase, or the rewrite itself when there is none."""
    return req.paraphrases[0] if req.paraphrases else req.rewrite


def loc_pairs(req: EditRequest, n: int = 1) -> list[tuple[str, str]]:
    """Locality inputs and the answers to keep: zsRE's (loc, loc_ans); CounterFact's neighborhood prompts (other
    subjects, same relation, whose answer is the edit's true target), up to n."""
    if req.neighborhood:
        return [(p, req.target_true) for p in req.neighborhood[:n]]
    if req.loc and req.loc_ans:
        return [(req.loc, req.loc_ans)]
    return []


def request_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Mean token NLL of each row's target, shape (B,)."""
    return -label_logprobs(logits, batch.labels).sum(-1) / batch.target_mask.sum(-1)


def kl_loc(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_θ ‖ p_θ̃) per target position, averaged over the masked positions."""
    lp_pre, lp_post = torch.log_softmax(pre.float(), -1), torch.log_softmax(post.float(), -1)
    kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
    return (kl * mask).sum() / mask.sum()
