"""Targets for an MLP output that passes through an RMS norm before the residual add (Gemma 2/3).

MEMIT's update (eq. 14) asks the MLP output m at a layer to change by that layer's share r of z − h, presuming m
joins the residual stream as it is. With a post-MLP norm the block adds y = N(m) = g ⊙ m / rms(m) instead, so
the wanted change is y → y* = y + r. N forgets m's scale, and its outputs lie on the surface
{g ⊙ u : rms(u) = 1}. The target is the point of that surface nearest to y*: u minimizes ‖g ⊙ u − y*‖ subject to
rms(u) = 1, so u_i = g_i y*_i / (g_i² + μ) with the one μ > −min g² that meets the constraint (found by bisection;
μ = 0, u = y* ⊘ g, when y* is on the surface). The MLP output's target is m* = u · rms(m), so N(m*) = g ⊙ u and m
keeps its rms; MEMIT's least squares then targets m* − m.

Why the nearest point and not the surface point on y*'s ray (u ∝ y* ⊘ g, used before): Gemma 3's gains span four
orders of magnitude (gemma3_270m, layers 2-6: median 2-13, a few dims 250-790). A share r spread over every
dimension then makes y* ⊘ g huge in the small-gain dims, rms(y* ⊘ g) ≫ 1, and the ray's point is y* shrunk by
that factor: it drops the large-gain dims that carry most of y, a change far bigger than r and not along it. On
50 dev records MEMIT's distance to z grew from 217 to 509 over its five layers and ES stayed at 18
(docs/results.md, "MEMIT on gemma3_270m").

Dead dimensions: where a gain is 0 (Gemma's 1 + w with w = −1: `post_feedforward_layernorm` of gemma3_270m has one
at layer 3 and seven at layer 4), N(m) is 0 whatever m is, so y* ⊘ g is undefined there and y cannot move. Those
dimensions D are left out and keep m (m*_D = m_D); on the live ones L the constraint is ‖u_L‖² = d − ‖m_D‖² / rms(m)²,
so that ‖m*_L‖ = ‖m_L‖ and rms(m*) = rms(m), which is the constraint above when D is empty.
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
    return torch.where(live, nearest_on_surface(g, y + resid.double(), m, live) - m, 0.0)


#: bisection steps for μ (the bracket shrinks 2^-200: far below float64 round-off)
BISECTION_STEPS = 200


def nearest_on_surface(g: torch.Tensor, y_star: torch.Tensor, m: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """m* (n, d), float64: m*_L = u_L · rms(m) with u_L the minimizer of ‖g_L ⊙ u_L − y*_L‖ on the sphere
    ‖u_L‖² = Σ_L m_L² / rms(m)² (module docstring); m*_D = m_D. `g` (d,), `live` (d,) bool, `y_star` and `m` (n, d)."""
    rms = _rms(m)
    a = torch.where(live, g * g, 0.0)                                   # g², 0 on dead dims
    b = torch.where(live, g * y_star, 0.0)                              # g ⊙ y*
    c = torch.where(live, m, 0.0).pow(2).sum(-1, keepdim=True) / rms.pow(2)  # ‖u_L‖² wanted
    a_min = a[live].min()

    def norm2(mu: torch.Tensor) -> torch.Tensor:  # ‖u_L(μ)‖², decreasing in μ > −a_min
        return torch.where(live, b / (a + mu), 0.0).pow(2).sum(-1, keepdim=True)

    lo = torch.full_like(c, -a_min.item()) * (1 - 1e-12)
    hi = b.norm(dim=-1, keepdim=True) / c.sqrt() + 1.0                 # ‖u_L(hi)‖ ≤ ‖b‖ / (a_min + hi) < √c
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        big = norm2(mid) > c
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    # where even μ → −min g² leaves ‖u_L‖² < c (y* has no part along the smallest gain: the "hard case" of this
    # trust-region problem), u_L stays on μ's lower bracket and rms(m*) falls a little short of rms(m); N ignores it
    u = torch.where(live, b / (a + hi), 0.0)
    return torch.where(live, u * rms, m)
