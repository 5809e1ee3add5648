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
                t = _first(args)
                cap.inputs[name] = t.detach() if detach else t
            if outputs:
                t = _first(out)
                cap.outputs[name] = t.detach() if detach else t
        return hook

    try:
        for n in names:
            handles.append(model.get_submodule(n).register_forward_hook(make(n)))
        yield cap
    finally:
        for h in handles:
            h.remove()


OutputEdit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edit_outputs(model: nn.Module, edits: dict[str, OutputEdit]) -> Iterator[None]:
    """Replace each named module's output tensor with `fn(output)` (tuples keep their other items)."""
    handles = []

    def make(fn: OutputEdit):
        def hook(_mod, _args, out):
            if isinstance(out, tuple):
                return (fn(out[0]),) + tuple(out[1:])
            return fn(out)
        return hook

    try:
        for n, fn in edits.items():
            handles.append(model.get_submodule(n).register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


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
