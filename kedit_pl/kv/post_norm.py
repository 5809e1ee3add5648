"""Targets for an MLP output that passes through an RMS norm before the residual add (Gemma 2/3).

MEMIT's update (eq. 14) asks the MLP output m at a layer to change by that layer's share r of z − h, presuming m
joins the residual stream as it is. With a post-MLP norm the block adds y = N(m) = g ⊙ m / rms(m) instead, so
the wanted change is y → y* = y + r. N forgets m's scale, and its outputs lie on the surface
{g ⊙ u : rms(u) = 1}: the pre-image of y* along its own ray is u = y* ⊘ g (N(s·u) = y* / rms(u) for every s > 0).
The MLP output's target is that u, scaled to keep m's rms: m* = u · rms(m) / rms(u), so N(m*) = y* exactly when
y* is on the surface and otherwise the surface point on y*'s ray. MEMIT's least squares then targets m* − m.
"""
from __future__ import annotations

import torch
from torch import nn

from kedit_pl.errors import EditFailed

#: how far N(m) may be from g ⊙ m / rms(m) (relative) for N to count as an RMS norm (eps and float32 round-off
#: stay far below; a LayerNorm's mean subtraction or bias does not)
RMS_TOLERANCE = 1e-3


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


@torch.no_grad()
def mlp_output_targets(norm: nn.Module, m: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
    """The change of the MLP outputs `m` (n, d) that moves the normed outputs N(m) by `resid` (n, d), float64.

    The gain g is read off the module (N(1) = g up to eps), so any RMS-norm parameterization (Gemma's 1 + w, or
    w) works; a norm that is not g ⊙ m / rms(m) on these m is an EditFailed naming it."""
    p = next(norm.parameters(), None)
    dtype = p.dtype if p is not None else m.dtype
    m = m.double()
    y = norm(m.to(dtype)).double()
    g = norm(torch.ones_like(m[:1], dtype=dtype)).double()[0]
    err = ((y - g * m / _rms(m)).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-30)).max().item()
    if not err < RMS_TOLERANCE or not torch.isfinite(g).all() or bool((g.abs() < 1e-6).any()):
        raise EditFailed(f"post-MLP norm {type(norm).__name__} is not an invertible RMS norm g·m/rms(m) here "
                         f"(relative mismatch {err:.2g}); MEMIT cannot target its input")
    u = (y + resid.double()) / g
    return u * (_rms(m) / _rms(u).clamp_min(1e-30)) - m
