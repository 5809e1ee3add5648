"""MEND: Model Editor Networks with Gradient Decomposition (Mitchell et al. 2022, "Fast Model Editing at Scale").

Editing (`compute_edit`, in `learned.py`): one backward pass of the edit loss on the rewrite prompts gives, for
each edited weight, its rank-1 gradient factors (u_t = layer input, δ_t = gradient at the layer output;
∇W = Σ_t δ_t u_tᵀ). They are captured with hooks, without materializing ∇W; the trained editor (`mend_net.py`)
maps them to the update ΔW = −α_ℓ Σ_t δ̃_t ũ_tᵀ, added to the weights in place.

Training (`training_step`, via train.py): the base model stays frozen; only the editor learns, on
    L_MEND = c_edit · L_edit + c_loc · L_loc                                          (paper §3.2)
L_edit = NLL of target_new on the rephrase (equivalence) prompt under W + ΔW, L_loc = KL(p_θ(·|x_loc) ‖
p_θ̃(·|x_loc)) on a locality prompt (zsRE: an unrelated NQ question; CounterFact: a neighborhood prompt, same
relation, other subject); `loc_loss=nll` uses the NLL of the unedited answer instead. Each request of a batch
is its own edit (the test protocol), or with `train_together=true` the batch is one edit of all of them.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch

from kedit_pl.data.requests import EditRequest
from kedit_pl.errors import ConfigError
from kedit_pl.methods.learned import Factors, LearnedEditor, read_checkpoint, rephrase, request_nll  # noqa: F401
from kedit_pl.methods.mend_net import EditorConfig, MendEditor

log = logging.getLogger(__name__)


class MEND(LearnedEditor):
    """A learned editor: `train.py method=mend` trains it, `edit.py method=mend method.checkpoint=PATH` uses it."""

    KIND, CONFIG = "mend", EditorConfig
    #: editor parameters trained at lr_lr (step sizes), not at lr (the editor MLPs)
    STEP_SIZES: tuple[str, ...] = ("alpha",)

    def __init__(self, model=None, tokenizer=None, spec=None, *, layers: Sequence[int] = (),
                 modules: Sequence[str] = ("mlp_in", "mlp_out"), rank: int = 1920, n_hidden: int = 1,
                 norm: bool = True, edit_lr: float = 1e-4, lr: float = 1e-6, lr_lr: float = 1e-4,
                 c_edit: float = 0.1, c_loc: float = 1.0, loc_loss: str = "kl", loc_prompts: int = 1,
                 train_together: bool = False, checkpoint: str | None = None, name: str = "mend") -> None:
        super().__init__(model, tokenizer, spec, layers=layers, modules=modules, loc_loss=loc_loss,
                         loc_prompts=loc_prompts)
        if rank < 1 or n_hidden < 0:
            raise ConfigError(f"method.rank/n_hidden: need rank >= 1, n_hidden >= 0; got rank={rank}, "
                              f"n_hidden={n_hidden}")
        if min(lr, lr_lr) <= 0 or min(c_edit, c_loc) < 0:
            raise ConfigError(f"method.lr/lr_lr must be > 0 and c_edit/c_loc >= 0; got lr={lr}, lr_lr={lr_lr}, "
                              f"c_edit={c_edit}, c_loc={c_loc}")
        self.lr, self.lr_lr, self.c_edit, self.c_loc = lr, lr_lr, c_edit, c_loc
        self.train_together = bool(train_together)
        cfg = EditorConfig(params=self._params(), rank=rank, n_hidden=n_hidden, norm=norm, edit_lr=edit_lr)
        self._init_editor(cfg, checkpoint)

    def build_editor(self, cfg: EditorConfig) -> MendEditor:
        """MEND's editor network for `cfg`."""
        return MendEditor(cfg)

    def request_deltas(self, requests: list[EditRequest], factors: Factors, mask: torch.Tensor
                       ) -> dict[str, torch.Tensor]:
        """Each request's ΔW from its own token rows (u_t, δ_t); padding rows are dropped."""
        owner = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(mask)[mask]
        rows = {p: (u[mask], d[mask]) for p, (u, d) in factors.items()}
        return self.editor.weight_deltas(rows, owner, len(requests))

    def losses(self, requests: list[EditRequest]) -> dict[str, torch.Tensor]:
        """L_MEND = c_edit·L_edit + c_loc·L_loc (paper §3.2), each request under its own edit."""
        nll_pre, factors, mask = self.gradient_factors(requests)
        deltas = self.request_deltas(requests, factors, mask)
        if self.train_together:  # one edit of the whole batch, seen by every row
            deltas = {n: d.sum(0, keepdim=True).expand_as(d) for n, d in deltas.items()}
        nll, acc = self.edited_nll([(i, rephrase(r), r.target_new) for i, r in enumerate(requests)], deltas)
        out = {"edit_loss": nll.mean(), "edit_acc": acc, "rewrite_nll_pre": nll_pre.mean(),
               "loc_loss": self.locality_loss(requests, deltas)}
        out["loss"] = self.c_edit * out["edit_loss"] + self.c_loc * out["loc_loss"]
        return out

    def training_step(self, batch: list[EditRequest], batch_idx: int) -> torch.Tensor:
        self.log("train/alpha_mean", self.editor.alpha.detach().mean(), batch_size=len(batch))
        return super().training_step(batch, batch_idx)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        # DDP: the running (u, δ) statistics merge every rank's rows, as one process with the whole batch would
        self.editor.share_statistics(self.all_gather if self.trainer.world_size > 1 else None)

    def on_fit_end(self) -> None:
        self.editor.share_statistics(None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        nets = [p for n, p in self.editor.named_parameters() if n not in self.STEP_SIZES]
        steps = [p for n, p in self.editor.named_parameters() if n in self.STEP_SIZES]
        return torch.optim.Adam([{"params": nets, "lr": self.lr}, {"params": steps, "lr": self.lr_lr}])
