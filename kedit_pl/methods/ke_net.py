"""KnowledgeEditor's networks (De Cao et al. 2021, "Editing Factual Knowledge in Language Models", §3).

Condition (§3.2): the text "{prediction} >> {alternative} || {input}" is embedded with the language model's own
token embeddings (frozen, passed in), read by a 1-layer BiLSTM, and the final states of both directions go
through an FFNN with tanh:  c = tanh(W_c [h→; h←] + b_c).

Per edited matrix W (n × m, in (out, in) orientation), a small MLP with weight-normalized layers maps c to
(α̂ ∈ Rⁿ, α ∈ Rᵐ, β̂ ∈ Rⁿ, β ∈ Rᵐ, η ∈ R) and the update is (the reference code's form of the paper's W̃ = W + ΔW)
    a = softmax(α̂) αᵀ,   b = softmax(β̂) βᵀ,   ΔW = max_scale · σ(η) · (∇W ⊙ a + b)
with ∇W the fine-tuning gradient of the edit loss. a and b are rank 1.

Initialization (ours, for short CPU training; the reference trains ~200k steps from PyTorch's default init):
the MLP's output bias starts α at −1 and β at 0, with β's weight-norm gains at 1 % of their default, so at step 0
ΔW ≈ −(max_scale / 2n) · (n·softmax(α̂)) ⊙ ∇W: a gradient-descent step of size ≈ max_scale / 2n, which training
then reshapes (MEND's editor likewise starts at the identity). The gradient enters raw, as in the paper, so
max_scale sets the step size for the model and layers edited (`conf/method/ke.yaml`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence


@dataclass(frozen=True)
class KEConfig:
    """Everything that fixes the editor's architecture and its update; saved next to its weights."""

    params: tuple[tuple[str, int, int], ...]  # (parameter name, d_out, d_in) of every edited weight
    embed_dim: int                            # the LM's token embedding width (BiLSTM input)
    lstm_dim: int = 128                       # BiLSTM hidden size per direction
    condition_dim: int = 1024                 # c
    hidden_dim: int = 128                     # the per-matrix MLP's hidden layer
    max_scale: float = 10.0

    def to_dict(self) -> dict:
        """The config as JSON-ready data."""
        return asdict(self) | {"params": [list(p) for p in self.params]}

    @classmethod
    def from_dict(cls, d: dict) -> "KEConfig":
        """Rebuild a config from `to_dict`'s data."""
        return cls(params=tuple((str(n), int(o), int(i)) for n, o, i in d["params"]), embed_dim=int(d["embed_dim"]),
                   lstm_dim=int(d["lstm_dim"]), condition_dim=int(d["condition_dim"]),
                   hidden_dim=int(d["hidden_dim"]), max_scale=float(d["max_scale"]))

    def arch(self) -> tuple:
        """What must match for weights to load and edit the same."""
        return self.params, self.embed_dim, self.lstm_dim, self.condition_dim, self.hidden_dim, self.max_scale


class Conditioner(nn.Module):
    """BiLSTM over the condition's token embeddings, then an FFNN with tanh (KE §3.2)."""

    def __init__(self, embed_dim: int, lstm_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(embed_dim, lstm_dim, num_layers=1, bidirectional=True, batch_first=True)
        self.ffnn = nn.Linear(2 * lstm_dim, condition_dim)

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """embeds (E, T, embed_dim), mask (E, T) right-padded -> c (E, condition_dim)."""
        lengths = mask.sum(-1).cpu()
        packed = pack_padded_sequence(embeds.float(), lengths, batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)  # h: (2, E, lstm_dim), the last state of each direction
        return torch.tanh(self.ffnn(torch.cat([h[0], h[1]], dim=-1)))


class MatrixGenerator(nn.Module):
    """The conditioned update of one n × m matrix: ΔW = max_scale · σ(η) · (∇W ⊙ a + b), a and b rank 1."""

    def __init__(self, n: int, m: int, cfg: KEConfig) -> None:
        super().__init__()
        self.n, self.m, self.max_scale = n, m, cfg.max_scale
        self.net = nn.Sequential(weight_norm(nn.Linear(cfg.condition_dim, cfg.hidden_dim)), nn.Tanh(),
                                 weight_norm(nn.Linear(cfg.hidden_dim, 2 * (n + m) + 1)))
        out = self.net[2]
        with torch.no_grad():  # see the module docstring: start as a gradient-descent step
            col_a, row_a, col_b, row_b, eta = self._split(out.bias)
            col_a.fill_(-1.0), col_b.zero_(), eta.zero_()
            g = out.parametrizations.weight.original0  # per-output-row gains of the weight norm
            g[n + m: n + 2 * m] *= 0.01

    def _split(self, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(α (m), α̂ (n), β (m), β̂ (n), η (1)) along the last dim, in the reference code's order."""
        return t.split([self.m, self.n, self.m, self.n, 1], dim=-1)

    def factors(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """a, b (E, n, m) and the gate σ(η) (E,) for conditions c (E, condition_dim)."""
        col_a, row_a, col_b, row_b, eta = self._split(self.net(c))
        a = row_a.softmax(-1)[:, :, None] * col_a[:, None, :]
        b = row_b.softmax(-1)[:, :, None] * col_b[:, None, :]
        return a, b, torch.sigmoid(eta[:, 0])

    def forward(self, c: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """ΔW (E, n, m) from conditions c (E, condition_dim) and gradients ∇W (E, n, m)."""
        a, b, gate = self.factors(c)
        return self.max_scale * gate[:, None, None] * (grad * a + b)


class KnowledgeEditorNet(nn.Module):
    """All of KE's learned state: the conditioner, one generator per edited matrix, and the training state of
    the constrained objective (Lagrange multiplier α ≥ 0 and the KL margin), kept here so resume restores it."""

    def __init__(self, cfg: KEConfig, alpha_init: float = 1.0, margin: float = 1e-3) -> None:
        super().__init__()
        self.cfg = cfg
        self.conditioner = Conditioner(cfg.embed_dim, cfg.lstm_dim, cfg.condition_dim)
        self.keys = {name: f"p{i}" for i, (name, _, _) in enumerate(cfg.params)}
        self.generators = nn.ModuleDict({self.keys[name]: MatrixGenerator(n, m, cfg) for name, n, m in cfg.params})
        self.lagrange = nn.Parameter(torch.tensor(float(alpha_init)))
        self.register_buffer("margin", torch.tensor(float(margin)))

    def forward(self, embeds: torch.Tensor, mask: torch.Tensor, grads: dict[str, torch.Tensor]
                ) -> dict[str, torch.Tensor]:
        """ΔW (E, n, m) per parameter for E edits: their condition tokens' embeddings and gradients ∇W."""
        c = self.conditioner(embeds, mask)
        return {name: self.generators[self.keys[name]](c, grads[name].float()) for name, _, _ in self.cfg.params}
