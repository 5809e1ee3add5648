"""The value optimization's matmuls in bfloat16 (`compute_dtype`, issue #19 §4).

ROME's v* and MEMIT's z spend three quarters of their time in the projections (attention q/k/v/o, the MLP, the
LM head) of the blocks above the edit layer. On a CPU with bf16 dot products (AVX512-BF16, AMX) a bf16 GEMM
runs about 4× faster than fp32 at these shapes, while elementwise bf16 is no faster than fp32. So only the
projections change precision: `lowp_forwards` makes every nn.Linear and GPT-2 Conv1D under the given modules
compute y = x Wᵀ + b from x, W, b rounded to bf16 (fp32 accumulation inside the GEMM) and hand back y in the
input's dtype. Norms, residual adds, attention, softmax, the loss, δ and Adam stay float32.

The parameters are never written. The bf16 copies live in a `LowpWeights` store (made on first use, remade when a
parameter's version counter or storage changes, so an edit or restore of that weight is always seen) and the
projections' `forward`s are replaced only for the duration of a call (`values.override_forward`), restored on
exit, also on error.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kedit_pl.errors import ConfigError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def compute_dtype(name: str) -> torch.dtype:
    """The torch dtype for a `compute_dtype` config value (one-line ConfigError otherwise)."""
    if name not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {sorted(COMPUTE_DTYPES)}, got {name!r}")
    return COMPUTE_DTYPES[name]


def is_projection(module: nn.Module) -> bool:
    """nn.Linear (and subclasses such as Falcon's) or GPT-2's Conv1D (weight stored (in, out))."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


class _LowpLinear(torch.autograd.Function):
    """y = x Wᵀ + b computed in W's dtype, returned in x's dtype; backward gives only ∂x (weights are frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w)
        ctx.x_dtype = x.dtype
        return F.linear(x.to(w.dtype), w, b).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (w,) = ctx.saved_tensors
        return (grad.to(w.dtype) @ w).to(ctx.x_dtype), None, None


class LowpWeights:
    """Low-precision copies of projection weights in (out, in) layout, keyed by the parameter.

    A copy is reused while the parameter keeps its storage and version counter (every in-place write, such as an
    edit's `W.add_` or a restore's `copy_`, bumps the counter); entries die with their parameters (weak keys).
    """

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype
        self._store = WeakIdKeyDictionary()

    def get(self, param: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """The low-precision copy of `param` (transposed if asked), made again only after the parameter changed."""
        key = (param._version, param.data_ptr(), tuple(param.shape), param.dtype, transpose)
        hit = self._store.get(param)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            src = param.detach().t() if transpose else param.detach()
            copy = src.to(self.dtype).contiguous()
        self._store[param] = (key, copy)
        return copy

    def clear(self) -> None:
        """Drop every copy."""
        self._store.clear()


_SHARED: dict[torch.dtype, LowpWeights] = {}


def shared_weights(dtype: torch.dtype) -> LowpWeights:
    """The process-wide store for `dtype` (copies persist across calls while the weights are unchanged)."""
    return _SHARED.setdefault(dtype, LowpWeights(dtype))


def _lowp_forward(module: nn.Module, store: LowpWeights) -> Callable[[torch.Tensor], torch.Tensor]:
    conv1d = type(module).__name__ == "Conv1D"
    w = store.get(module.weight, transpose=conv1d)
    b = store.get(module.bias) if getattr(module, "bias", None) is not None else None
    return lambda x: _LowpLinear.apply(x, w, b)


def lowp_forwards(modules: list[nn.Module], dtype: torch.dtype,
                  store: LowpWeights | None = None) -> dict[nn.Module, Callable]:
    """A `forward` computing in `dtype` for every projection under `modules` (none at float32), for
    `values.override_forward` to install for the duration of a call."""
    if dtype == torch.float32:
        return {}
    store = store or shared_weights(dtype)
    return {mod: _lowp_forward(mod, store) for root in modules for mod in root.modules() if is_projection(mod)}
