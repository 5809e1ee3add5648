"""Forward hooks on named modules: capture inputs/outputs, or edit outputs in flight.

ROME, MEMIT, causal tracing, FT and MEND all need one of these; they share this file.
Every context manager removes its hooks on exit, also on error.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn


def _first(x):
    return x[0] if isinstance(x, tuple) else x


@contextmanager
def _token_grid(model: nn.Module) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """A function that views a module's (batch·tokens, width) tensor as (batch, tokens, width).

    Some decoders flatten the tokens into rows inside a block (OPT runs fc1/fc2 on (B·T, d)); hooks then still see
    the (B, T, d) layout every caller indexes. The grid comes from the input_ids of the model's current forward.
    """
    grid: list[tuple[int, int]] = []

    def pre(_mod, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            grid[:] = [tuple(ids.shape)]

    def view(t: torch.Tensor) -> torch.Tensor:
        if grid and t.dim() == 2 and t.shape[0] == grid[0][0] * grid[0][1]:  # also one token per row (B·1)
            return t.view(*grid[0], t.shape[-1])
        return t

    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield view
    finally:
        h.remove()


class Capture:
    """Holds what `capture()` recorded: `inputs[name]` (first positional input) and `outputs[name]`."""

    def __init__(self) -> None:
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}


@contextmanager
def capture(model: nn.Module, names: list[str], inputs: bool = False, outputs: bool = True,
            detach: bool = True) -> Iterator[Capture]:
    """Record the first input and/or the output tensor of each named module on the next forward."""
    cap = Capture()
    handles = []

    def make(name: str):
        def hook(_mod, args, out):
            if inputs:
                t = grid(_first(args))
                cap.inputs[name] = t.detach() if detach else t
            if outputs:
                t = grid(_first(out))
                cap.outputs[name] = t.detach() if detach else t
        return hook

    try:
        with _token_grid(model) as grid:
            for n in names:
                handles.append(model.get_submodule(n).register_forward_hook(make(n)))
            yield cap
    finally:
        for h in handles:
            h.remove()


OutputEdit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def _forward_hooks(model: nn.Module, hooks: dict[str, Callable]) -> Iterator[None]:
    """Register `hooks[name]` as a forward hook of each named module; remove them all on exit."""
    handles = []
    try:
        for n, hook in hooks.items():
            handles.append(model.get_submodule(n).register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def _replace_output(out, fn: Callable[[torch.Tensor], torch.Tensor]):
    """A module output with its (first) tensor replaced by fn(tensor); tuples keep their other items."""
    if isinstance(out, tuple):
        return (fn(out[0]),) + tuple(out[1:])
    return fn(out)


@contextmanager
def edit_outputs(model: nn.Module, edits: dict[str, OutputEdit]) -> Iterator[None]:
    """Replace each named module's output tensor with `fn(output)` (tuples keep their other items)."""
    def make(fn: OutputEdit):
        def hook(_mod, _args, out):
            return _replace_output(out, lambda t: fn(grid(t)).reshape(t.shape))
        return hook

    with _token_grid(model) as grid, _forward_hooks(model, {n: make(fn) for n, fn in edits.items()}):
        yield


@contextmanager
def edit_inputs(model: nn.Module, edits: dict[str, OutputEdit]) -> Iterator[None]:
    """Replace each named module's first positional input with `fn(input)`."""
    handles = []

    def make(fn: OutputEdit):
        def hook(_mod, args):
            return (fn(args[0]),) + tuple(args[1:])
        return hook

    try:
        for n, fn in edits.items():
            handles.append(model.get_submodule(n).register_forward_pre_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


class StopForward(Exception):
    """Raised by `run_until` to end a forward pass once the wanted module has run."""


@contextmanager
def stop_after(model: nn.Module, name: str) -> Iterator[None]:
    """Abort the forward pass right after module `name` (use with capture to read lower layers cheaply)."""
    def hook(_mod, _args, _out):
        raise StopForward

    h = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


@contextmanager
def linear_deltas(model: nn.Module, deltas: dict[str, torch.Tensor], owner: torch.Tensor) -> Iterator[None]:
    """Run linear modules as if their weights were W + ΔW, with a different ΔW for each batch row.

    `deltas[name]` is (E, d_out, d_in) (one update per edit, in (out, in) orientation whatever the storage) and
    row b of the batch is edited by ΔW[owner[b]]: the module's output gains x_b ΔW[owner[b]]ᵀ. Learned editors
    train on many independent edits in one forward pass this way; gradients flow into the ΔW.
    """
    def make(delta: torch.Tensor):
        def hook(_mod, args, out):
            x = grid(_first(args))
            extra = torch.bmm(x, delta[owner].transpose(1, 2).to(x.dtype))  # (B, T, d_out)
            return _replace_output(out, lambda t: t + extra.reshape(t.shape))
        return hook

    with _token_grid(model) as grid, _forward_hooks(model, {n: make(d) for n, d in deltas.items()}):
        yield


#: batch rows [start, stop) and, per module, the parameters they use instead of the module's ({"weight"/"bias":
#: tensor}) or a ΔW (out, in) whose x ΔWᵀ they add to its output ({"delta": tensor}, a WISE side memory)
RowWeights = tuple[int, int, dict[str, dict[str, torch.Tensor]]]


def _linear_output(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A linear module's own formula with other parameters: Linear y = x Wᵀ + b; GPT-2's Conv1D y = x W + b."""
    if type(module).__name__ == "Conv1D":
        y = x @ weight
        return y if bias is None else y + bias
    return nn.functional.linear(x, weight, bias)


@contextmanager
def row_weights(model: nn.Module, blocks: list[RowWeights]) -> Iterator[None]:
    """Run linear modules with other weights for some batch rows: for each block (start, stop, params), rows
    start..stop of each module in `params` are recomputed with that module's formula and the block's weight/bias
    (what it leaves out stays the module's own). Unlike `linear_deltas` this is the edited layer itself, not
    W x + ΔW x, so each block's rows get the numbers of a model that holds its weights. A block given
    {"delta": ΔW} instead adds x ΔWᵀ (in float32, as WISE computes its side memory) to the module's output."""
    by_module: dict[str, list[RowWeights]] = {}
    for block in blocks:
        for name in block[2]:
            by_module.setdefault(name, []).append(block)

    def make(module: nn.Module, name: str):
        def hook(_mod, args, out):
            x, y = grid(_first(args)), grid(_first(out))  # views: writing y writes the output
            for start, stop, params in by_module[name]:
                p = params[name]
                if "delta" in p:
                    y[start:stop] = y[start:stop] + (x[start:stop].float() @ p["delta"].T).to(y.dtype)
                else:
                    y[start:stop] = _linear_output(module, x[start:stop], p.get("weight", module.weight),
                                                   p.get("bias", module.bias)).to(y.dtype)
            return out
        return hook

    if not by_module:  # nothing to recompute: no hook at all (a hooked model reads shared prefixes row by row)
        yield
        return
    hooks = {n: make(model.get_submodule(n), n) for n in by_module}
    with _token_grid(model) as grid, _forward_hooks(model, hooks):
        yield


@contextmanager
def first_pass_outputs(model: nn.Module, patches: dict[str, list[tuple[int, torch.Tensor]]]) -> Iterator[None]:
    """In the next forward only (a prompt's pass; continuations from its cache are left alone), set the output of
    each named module at the last position of the listed rows: `patches[name] = [(row, vector)]`. What a
    GRACE codebook hit does to the prompt's last token (left-padded rows: every prompt ends in the last column)."""
    done: set[str] = set()

    def make(name: str):
        def hook(_mod, _args, out):
            if name in done:
                return out
            done.add(name)
            y = grid(_first(out))
            for row, vector in patches[name]:
                y[row, -1] = vector.to(y.dtype)
            return out
        return hook

    if not patches:  # nothing to set: no hook at all
        yield
        return
    with _token_grid(model) as grid, _forward_hooks(model, {n: make(n) for n in patches}):
        yield


def observer(hook: Callable) -> Callable:
    """Mark a forward (pre-)hook that only reads what it is given and returns None: it changes no output, so code
    that reuses computation across model states (`eval/block_inputs.py`) may look past it."""
    hook.observes_only = True
    return hook


@contextmanager
def override_forward(replacements: dict[nn.Module, Callable]) -> Iterator[None]:
    """Temporarily set `module.forward` (instance attribute); always restores the previous state."""
    missing = object()
    saved = []
    try:
        for mod, fn in replacements.items():
            saved.append((mod, mod.__dict__.get("forward", missing)))
            mod.forward = fn
        yield
    finally:
        for mod, old in reversed(saved):
            if old is missing:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = old


def _restructure(template_out, hidden: torch.Tensor):
    """Return `hidden` in the same structure (tensor or tuple) a block returned originally."""
    return (hidden,) + tuple(template_out[1:]) if isinstance(template_out, tuple) else hidden


def _on_hidden(fn: Callable, hidden: torch.Tensor) -> Callable:
    """Wrap a block forward so it runs on `hidden` instead of the hidden states it is called with."""
    def call(*args, **kwargs):
        if args:
            return fn(hidden, *args[1:], **kwargs)
        return fn(**{**kwargs, "hidden_states": hidden})
    return call
