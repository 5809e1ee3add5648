"""Targets for an MLP output that passes through an RMS norm before the residual add (Gemma 2/3).

MEMIT's update (eq. 14) asks the MLP output m at a layer to change by that layer's share r of z − h, presuming m
joins the residual stream as it is. With a post-MLP norm the block adds y = N(m) = g ⊙ m / rms(m) instead, so
the wanted change is y → y* = y + r. N forgets m's scale, and its outputs lie on the surface
{g ⊙ u : rms(u) = 1}: the pre-image of y* along its own ray is u = y* ⊘ g (N(s·u) = y* / rms(u) for every s > 0).
The MLP output's target is that u, scaled to keep m's rms: m* = u · rms(m) / rms(u), so N(m*) = y* exactly when
y* is on the surface and otherwise the surface point on y*'s ray. MEMIT's least squares then targets m* − m.

Dead dimensions: where a gain is 0 (Gemma's 1 + w with w = −1: `post_feedforward_layernorm` of gemma3_270m has one
at layer 3 and seven at layer 4), N(m) is 0 whatever m is, so y* ⊘ g is undefined there and y cannot move. Those
dimensions D are left out of the pre-image and keep m (m*_D = m_D); on the live ones L the pre-image is scaled to
keep ‖m_L‖, m*_L = u_L · ‖m_L‖ / ‖u_L‖, which keeps rms(m) and reduces to the formula above when D is empty.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from kedit_pl.errors import EditFailed

#: how far N(m) may be from g ⊙ m / rms(m) (relative) for N to count as an RMS norm (eps and float32 round-off
#: stay far below; a LayerNorm's mean subtraction or bias does not)
RMS_TOLERANCE = 1e-3
#: a gain this small relative to the largest one counts as 0: that output dimension cannot move
DEAD_GAIN = 1e-6

log = logging.getLogger(__name__)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def mlp_output_targets(norm: nn.Module, m: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The change of the MLP outputs `m` (n, d) that moves the normed outputs N(m) by `resid` (n, d), float64.

    The gain g is read off the module (N(1) = g up to eps), so any RMS-norm parameterization (Gemma's 1 + w, or
    w) works; a norm that is not g ⊙ m / rms(m) on these m is an EditFailed naming the cause. Dimensions with a
    zero gain keep m (module docstring)."""
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else m.dtype
    m = m.double()
    y = norm(m.to(dtype)).double()
    g = norm(torch.ones_like(m[:1], dtype=dtype)).double()[0]
    name = type(norm).__name__
    if not torch.isfinite(g).all():
        raise EditFailed(f"post-MLP norm {name} has non-finite gains; MEMIT cannot target its input")
    err = ((y - g * m / _rms(m)).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)).max().item()
    if not err < RMS_TOLERANCE:
        raise EditFailed(f"post-MLP norm {name} is not an invertible RMS norm g·m/rms(m) here "
                         f"(relative mismatch {err:.2g} >= {RMS_TOLERANCE:g}); MEMIT cannot target its input")
    live = g.abs() > DEAD_GAIN * g.abs().max()
    if not live.any():
        raise EditFailed(f"post-MLP norm {name} has every gain 0: its output cannot move, MEMIT cannot edit here")
    if not live.all():
        log.debug("post-MLP norm %s: %d of %d gains are 0; those outputs cannot move and keep m",
                  name, int((~live).sum()), g.numel())
    u = torch.where(live, (y + resid.double()) / torch.where(live, g, 1.0), 0.0)  # the pre-image on live dims
    m_live = torch.where(live, m, 0.0)
    scale = m_live.norm(dim=-1, keepdim=True) / u.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    return torch.where(live, u * scale - m, 0.0)
