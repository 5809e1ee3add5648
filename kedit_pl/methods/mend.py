"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, "Fast Model Editing at Scale").

Editing (`compute_edit`): one backward pass of the edit loss on the rewrite prompts gives, for each edited
weight, its rank-1 gradient factors (u_t = layer input, δ_t = gradient at the layer output; ∇W = Σ_t δ_t u_tᵀ).
They are captured with hooks, without materializing ∇W; the trained editor (`mend_net.py`) maps them to
the update ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ, added to the weights in place.

Training (`training_step`, via train.py): the base model stays frozen; only the editor learns, on
    L_MEND = c_edit · L_edit + c_loc · L_loc                                          (paper §3.2)
L_edit = NLL of target_new on the rephrase (equivalence) prompt under W + ΔW, L_loc = KL(p_θ(·|x_loc) ‖
p_θ̃(·|x_loc)) on an unrelated prompt; the edited model is run with torch.func.functional_call so the loss
differentiates through ΔW into the editor.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.func import functional_call

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.hooks import capture, edit_outputs
from kedit_pl.io import load_torch_checkpoint, read_tensors, save_tensors, write_json
from kedit_pl.methods.base import EditMethod
from kedit_pl.methods.mend_net import EditorConfig, Factors, MendEditor
from kedit_pl.models.spec import linear_weight
from kedit_pl.tokens import TargetBatch, encode_targets, label_logprobs

log = logging.getLogger(__name__)

WEIGHTS_FILE, CONFIG_FILE, FORMAT = "editor.safetensors", "editor.json", 1
NO_CHECKPOINT = ("method.checkpoint: MEND edits with a trained editor network and none was given (it never falls "
                 "back to an untrained one). Train one: `python train.py method=mend dataset=zsre`, then pass "
                 "method.checkpoint=<train run dir>/editor (an exported dir, its editor.safetensors, or a "
                 "Lightning .ckpt from <run dir>/checkpoints)")


class MEND(EditMethod):
    """A learned editor: `train.py method=mend` trains it, `edit.py method=mend method.checkpoint=PATH` uses it."""

    trainable = True

    def __init__(self, model=None, tokenizer=None, spec=None, *, layers: Sequence[int] = (),
                 modules: Sequence[str] = ("mlp_in", "mlp_out"), rank: int = 1920, n_hidden: int = 1,
                 norm: bool = True, edit_lr: float = 1e-4, lr: float = 1e-6, lr_lr: float = 1e-4,
                 c_edit: float = 0.1, c_loc: float = 1.0, checkpoint: str | None = None, name: str = "mend") -> None:
        super().__init__(model, tokenizer, spec)
        if not layers or rank < 1 or n_hidden < 0:
            raise ConfigError(f"method.layers/rank/n_hidden: need layers, rank >= 1, n_hidden >= 0; "
                              f"got layers={list(layers)}, rank={rank}, n_hidden={n_hidden}")
        if min(lr, lr_lr) <= 0 or min(c_edit, c_loc) < 0:
            raise ConfigError(f"method.lr/lr_lr must be > 0 and c_edit/c_loc >= 0; got lr={lr}, lr_lr={lr_lr}, "
                              f"c_edit={c_edit}, c_loc={c_loc}")
        self.lr, self.lr_lr, self.c_edit, self.c_loc = lr, lr_lr, c_edit, c_loc
        self.layers, self.module_kinds = list(layers), list(modules)
        params = tuple((spec.weight_name(m, layer), *self._shape(spec.module_name(m, layer)))
                       for layer in self.layers for m in self.module_kinds)
        cfg = EditorConfig(params=params, rank=rank, n_hidden=n_hidden, norm=norm, edit_lr=edit_lr)
        #: True once the editor is trained (fit started) or loaded; editing refuses an untrained editor.
        self.ready = False
        if checkpoint:
            cfg, state = self._read_checkpoint(checkpoint, cfg)
        self.editor = MendEditor(cfg)
        if checkpoint:
            try:
                self.editor.load_state_dict(state)
            except RuntimeError as e:
                raise ConfigError(f"method.checkpoint: {checkpoint} does not fit its own editor config ({e})") from None
            self.ready = True
            log.info("loaded MEND editor from %s", checkpoint)

    # --- architecture ----------------------------------------------------------------------------
    def _shape(self, module_name: str) -> tuple[int, int]:
        """(d_out, d_in) of a projection, whatever its storage orientation."""
        w = self.model.get_submodule(module_name).weight
        if w.dim() != 2:
            raise ConfigError(f"method.modules: {module_name} has a {w.dim()}-D weight; MEND edits 2-D projections")
        return tuple(linear_weight(self.model.get_submodule(module_name)).shape)

    def _module(self, param: str) -> str:
        return param.removesuffix(".weight")

    def _stored(self, param: str, delta: torch.Tensor) -> torch.Tensor:
        """A (d_out, d_in) update in the parameter's own layout (GPT-2's Conv1D stores the transpose)."""
        module = self.model.get_submodule(self._module(param))
        return delta if linear_weight(module) is module.weight else delta.T

    def edited_parameters(self, requests: list[EditRequest]) -> list[str]:
        return [name for name, _, _ in self.editor.cfg.params]

    # --- the gradient factors and the update -----------------------------------------------------
    def gradient_factors(self, requests: list[EditRequest]) -> tuple[torch.Tensor, Factors]:
        """Per-request NLL of target_new after the rewrite, and each weight's token rows (u_t, δ_t).

        The loss is Σ_requests (mean token NLL), so each request contributes its own gradient to a batch edit.
        """
        batch = self._encode([r.rewrite for r in requests], [r.target_new for r in requests])
        modules = [self._module(p) for p in self.edited_parameters(requests)]
        track = {m: (lambda out: out if out.requires_grad else out.requires_grad_()) for m in modules}
        with torch.enable_grad(), edit_outputs(self.model, track), \
                capture(self.model, modules, inputs=True, outputs=True, detach=False) as cap:
            nll = request_nll(self._logits(batch), batch)
            deltas = torch.autograd.grad(nll.sum(), [cap.outputs[m] for m in modules])
        keep = batch.attention_mask.reshape(-1).bool()
        factors = {}
        for (param, d_out, d_in), m, delta in zip(self.editor.cfg.params, modules, deltas):
            factors[param] = (cap.inputs[m].detach().reshape(-1, d_in)[keep], delta.reshape(-1, d_out)[keep])
        return nll.detach(), factors

    def weight_deltas(self, factors: Factors) -> dict[str, torch.Tensor]:
        """The editor's ΔW for each parameter, in the parameter's layout and dtype."""
        named = dict(self.model.named_parameters())
        return {n: self._stored(n, d).to(named[n].dtype) for n, d in self.editor.weight_deltas(factors).items()}

    def compute_edit(self, requests: list[EditRequest]) -> dict[str, Any]:
        if not self.ready:
            raise ConfigError(NO_CHECKPOINT)
        was_training = self.editor.training
        self.editor.eval()  # editing never updates the normalization statistics
        try:
            nll, factors = self.gradient_factors(requests)
            with torch.no_grad():
                deltas = self.weight_deltas(factors)
                named = dict(self.model.named_parameters())
                for n, d in deltas.items():
                    named[n].add_(d)
        finally:
            self.editor.train(was_training)
        return {"rewrite_nll_pre": float(nll.mean()), "update_norm": float(sum(d.norm() for d in deltas.values()))}

    # --- training ------------------------------------------------------------------------------------
    def _encode(self, prompts: list[str], targets: list[str]) -> TargetBatch:
        return encode_targets(self.tok, prompts, targets).to(self.device)

    def _logits(self, batch: TargetBatch, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if params is None:
            return self.model(**kwargs).logits
        return functional_call(self.model, params, args=(), kwargs=kwargs).logits

    def losses(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """L_MEND = c_edit·L_edit + c_loc·L_loc (paper §3.2) for a batch of edits applied together."""
        nll_pre, factors = self.gradient_factors(requests)
        named = dict(self.model.named_parameters())
        edited = {n: named[n] + d for n, d in self.weight_deltas(factors).items()}
        eq = self._encode([rephrase(r) for r in requests], [r.target_new for r in requests])
        post = self._logits(eq, edited)
        out = {"edit_loss": request_nll(post, eq).mean(), "edit_acc": token_accuracy(post, eq),
               "rewrite_nll_pre": nll_pre.mean()}
        pairs = [p for p in map(loc_pair, requests) if p is not None]
        out["loc_loss"] = torch.zeros((), device=self.device)
        if pairs:
            loc = self._encode([p for p, _ in pairs], [a for _, a in pairs])
            with torch.no_grad():
                pre_loc = self._logits(loc)
            out["loc_loss"] = kl_loc(pre_loc, self._logits(loc, edited), loc.target_mask)
        out["loss"] = self.c_edit * out["edit_loss"] + self.c_loc * out["loc_loss"]
        return out

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], n: int) -> None:
        for k, v in losses.items():
            self.log(f"{stage}/{k}", v.detach(), prog_bar=k in ("loss", "edit_loss"), batch_size=n)
        if stage == "train":
            self.log("train/alpha_mean", self.editor.alpha.detach().mean(), batch_size=n)

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch)
        self._log_losses("train", losses, len(batch))
        return losses["loss"]

    def validation_step(self, batch: list[EditRequest], batch_idx: int) -> None:
        self._log_losses("val", self.losses(batch), len(batch))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        nets = [p for n, p in self.editor.named_parameters() if n != "alpha"]
        return torch.optim.Adam([{"params": nets, "lr": self.lr}, {"params": [self.editor.alpha], "lr": self.lr_lr}])

    def train(self, mode: bool = True) -> "MEND":
        """Only the editor switches modes; the frozen base model always runs in eval mode."""
        super().train(mode)
        if self.model is not None:
            self.model.eval()
        return self

    def on_fit_start(self) -> None:
        self.ready = True
        # DDP: the running (u, δ) statistics merge every rank's rows, as one process with the whole batch would
        self.editor.share_statistics(self.all_gather if self.trainer.world_size > 1 else None)

    def on_fit_end(self) -> None:
        self.editor.share_statistics(None)

    def setup(self, stage: str) -> None:
        if stage == "test" and not self.ready:  # edit.py: fail before any scoring work
            raise ConfigError(NO_CHECKPOINT)

    # --- checkpoints: the editor only, never the frozen base model ------------------------------------
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        return self.editor.state_dict(destination=destination, prefix=prefix + "editor.", keep_vars=keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        editor = {k.removeprefix("editor."): v for k, v in state_dict.items() if k.startswith("editor.")}
        other = [k for k in state_dict if not k.startswith("editor.")]
        if other and strict:
            raise ConfigError(f"MEND checkpoint: unexpected entries {other[:3]}; it should hold only editor.* weights")
        return self.editor.load_state_dict(editor, strict=strict, assign=assign)

    def editor_meta(self) -> dict[str, Any]:
        return {"format": FORMAT, "method": "mend", "model": self.spec.name, "layers": self.layers,
                "modules": self.module_kinds, "editor": self.editor.cfg.to_dict()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mend"] = self.editor_meta()

    def export(self, directory: str | Path) -> Path:
        """Write `editor.safetensors` (weights + running statistics) and `editor.json` (its config)."""
        directory = Path(directory)
        meta = self.editor_meta()
        save_tensors(directory / WEIGHTS_FILE, self.editor.state_dict(), metadata={"mend": json.dumps(meta)})
        write_json(directory / CONFIG_FILE, meta)
        return directory

    def load_editor(self, path: str | Path) -> None:
        """Load editor weights from an exported editor or a train.py checkpoint (same architecture)."""
        _, state = self._read_checkpoint(str(path), self.editor.cfg)
        self.editor.load_state_dict(state)
        self.ready = True

    def _read_checkpoint(self, path: str, wanted: EditorConfig) -> tuple[EditorConfig, dict[str, torch.Tensor]]:
        """The editor's architecture and state from `path`, checked against the loaded model."""
        meta, state = read_checkpoint(path)
        if meta.get("model") != self.spec.name:
            raise ConfigError(f"method.checkpoint: {path} was trained for model '{meta.get('model')}', "
                              f"not '{self.spec.name}'; pick the matching model=...")
        cfg = EditorConfig.from_dict(meta["editor"])
        named = dict(self.model.named_parameters())
        for pname, d_out, d_in in cfg.params:
            if pname not in named or self._shape(self._module(pname)) != (d_out, d_in):
                raise ConfigError(f"method.checkpoint: {path} edits {pname} ({d_out}x{d_in}), which this model "
                                  f"does not have with that shape")
        arch = (cfg.params, cfg.rank, cfg.n_hidden, cfg.norm)
        if arch != (wanted.params, wanted.rank, wanted.n_hidden, wanted.norm):
            log.warning("method.checkpoint: using the checkpoint's editor (layers %s, modules %s, rank %d, "
                        "n_hidden %d, norm %s), not the method config's", meta.get("layers"), meta.get("modules"),
                        cfg.rank, cfg.n_hidden, cfg.norm)
            self.layers, self.module_kinds = list(meta["layers"]), list(meta["modules"])
        return cfg, state


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Editor metadata and tensors, loaded without pickle (safetensors, or torch.load(weights_only=True))."""
    p = Path(path).expanduser()
    p = p / WEIGHTS_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError(f"method.checkpoint: {p} does not exist; pass an exported editor dir, its "
                          f"{WEIGHTS_FILE}, or a Lightning .ckpt")
    try:
        if p.suffix == ".safetensors":
            tensors, meta = read_tensors(p, "method.checkpoint")
            return _checked(json.loads(meta["mend"]), p), tensors
        if p.suffix == ".ckpt":
            ckpt = load_torch_checkpoint(p, "method.checkpoint")
            state = {k.removeprefix("editor."): v for k, v in ckpt["state_dict"].items() if k.startswith("editor.")}
            return _checked(ckpt["mend"], p), state
    except (KeyError, ValueError, AttributeError) as e:
        raise ConfigError(f"method.checkpoint: {p} is not a MEND editor checkpoint ({type(e).__name__}: {e})"
                          ) from None
    raise ConfigError(f"method.checkpoint: {p} must be a directory, a .safetensors or a .ckpt file")


def _checked(meta: Any, path: Path) -> dict[str, Any]:
    """The metadata dict, if it describes a MEND editor this code can read."""
    ok = isinstance(meta, dict) and meta.get("method") == "mend" and meta.get("format") == FORMAT
    if not ok or "editor" not in meta:
        raise ConfigError(f"method.checkpoint: {path} has no MEND editor metadata (format {FORMAT})")
    return meta


# --- loss pieces -------------------------------------------------------------------------------------
def rephrase(req: EditRequest) -> str:
    """The equivalence input of L_edit: the first paraphrase, or the rewrite itself when there is none."""
    return req.paraphrases[0] if req.paraphrases else req.rewrite


def loc_pair(req: EditRequest) -> tuple[str, str] | None:
    """The locality input of L_loc: zsRE's (loc, loc_ans), else a CounterFact neighborhood prompt + true target."""
    if req.loc and req.loc_ans:
        return req.loc, req.loc_ans
    if req.neighborhood:
        return req.neighborhood[0], req.target_true
    return None


def request_nll(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    """Mean token NLL of each row's target, shape (B,)."""
    return -label_logprobs(logits, batch.labels).sum(-1) / batch.target_mask.sum(-1)


def token_accuracy(logits: torch.Tensor, batch: TargetBatch) -> torch.Tensor:
    mask = batch.target_mask
    return ((logits.argmax(-1) == batch.labels) & mask).sum().float().div(mask.sum()).detach()


def kl_loc(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL(p_θ ‖ p_θ̃) per target position, averaged over the masked positions."""
    lp_pre, lp_post = torch.log_softmax(pre.float(), -1), torch.log_softmax(post.float(), -1)
    kl = (lp_pre.exp() * (lp_pre - lp_post)).sum(-1)
    return (kl * mask).sum() / mask.sum()
