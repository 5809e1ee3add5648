"""Perplexity passes that start at the lowest block an edit touched (general ability, `eval/groups/general.py`).

An edit changes a few blocks (ROME one down projection, MEND the last three MLPs) or hooks one module (GRACE,
WISE). Every block below the lowest touched one computes what it computed on the last measured state, so the
hidden states entering that block over the fixed WikiText windows are kept (`KeptInputs`, 46 MB for 20k tokens
of smollm2_135m), and a later pass starts there: the blocks below become pass-throughs and the first kept block
reads the kept input. A digest of every parameter and buffer outside the blocks from there up, and the absence
of any hook below, decide whether the kept inputs still hold; the logits are then bit for bit those of a full
pass. Which block to keep is only a hint (the edit handle's changed parameters, the hooked modules): a wrong hint
costs time, never correctness, because the digest is checked before every reuse.
"""
from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from kedit_pl.digests import tensor_digest
from kedit_pl.hooks import _on_hidden, _restructure, override_forward
from kedit_pl.weights import EditHandle


def _block_index(name: str, blocks: list[str] | tuple[str, ...]) -> int | None:
    """Index of the block (module prefix) that holds module/parameter `name` (None: outside every one)."""
    for i, b in enumerate(blocks):
        if name == b or name.startswith(b + "."):
            return i
    return None


def _lowest(names: list[str], blocks: list[str], above: tuple[str, ...]) -> int | None:
    """The lowest block among `names`; 0 when one lies outside every block and outside the modules `above` them
    (final norm, LM head); None when `names` is empty."""
    out: int | None = None
    for n in names:
        i = _block_index(n, blocks)
        if i is None:
            if _block_index(n, above) is not None:
                continue
            i = 0
        out = i if out is None else min(out, i)
    return out


def hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that carry a forward (pre-)hook that may change what it sees ("" is the model
    itself); hooks marked `hooks.observer` (GRACE's watch of the attention mask) only read, and are passed over."""
    return [n for n, m in model.named_modules()
            if any(not getattr(h, "observes_only", False) for h in (*m._forward_hooks.values(),
                                                                       *m._forward_pre_hooks.values()))]


def touched_block(model: nn.Module, blocks: list[str], above: tuple[str, ...], handle: EditHandle | None) -> int | None:
    """The lowest block that the current state changed (a parameter in `handle` that differs from its original)
    or hooks; None when neither says (e.g. the unedited model)."""
    params = dict(model.named_parameters())
    changed = [n for n, orig in (handle.originals.items() if handle else ())
               if n in params and not torch.equal(params[n], orig)]
    found = [i for i in (_lowest(changed, blocks, above), _lowest(hooked_modules(model), blocks, above))
             if i is not None]
    return min(found) if found else None


def lower_digest(model: nn.Module, blocks: list[str], start: int) -> str:
    """Digest of every parameter and buffer outside blocks `start`.. : what the input of block `start` depends on."""
    upper = blocks[start:]
    items = [(n, t) for kind in (model.named_parameters(), model.named_buffers()) for n, t in kind
             if _block_index(n, upper) is None]
    return tensor_digest(items)


@dataclass
class KeptInputs:
    """The hidden states entering block `start` on each forward of a pass, for the lower weights `digest`."""

    start: int
    digest: str
    inputs: list[torch.Tensor] = field(default_factory=list)
    #: per lower block, what its forward returned besides the hidden states (None: the hidden states alone)
    templates: list[tuple | None] = field(default_factory=list)


class BlockInputs:
    """Keeps the inputs of one block over a fixed sequence of forwards, and starts later passes there."""

    def __init__(self) -> None:
        self.kept: KeptInputs | None = None
        self.reused = 0  # passes that started above block 0 (what the tests check)

    def usable(self, model: nn.Module, blocks: list[str], above: tuple[str, ...]) -> bool:
        """Whether the kept inputs hold for the current state: no hook below their block, same lower weights."""
        k = self.kept
        if k is None:
            return False
        low = _lowest(hooked_modules(model), blocks, above)
        return (low is None or low >= k.start) and lower_digest(model, blocks, k.start) == k.digest

    def for_method(self, method) -> AbstractContextManager:
        """`around` for an edit method's current state: its model's blocks (`method.spec`), the hint from its last
        edit handle and hooks. A method without a spec runs whole."""
        spec = getattr(method, "spec", None)
        if spec is None:
            return nullcontext()
        model = method.model
        blocks = [spec.module_name("layer", i) for i in range(spec.n_layers)]
        above = (spec.final_norm, spec.lm_head)
        return self.around(model, blocks, above, touched_block(model, blocks, above, getattr(method, "last_handle", None)))

    @contextmanager
    def around(self, model: nn.Module, blocks: list[str], above: tuple[str, ...],
               hint: int | None) -> Iterator[None]:
        """Run the forwards inside from the kept block when `usable`; else run them whole and keep the inputs of
        block `hint` (when given and above 0) for the next state. The forwards must be the same sequence each time."""
        if self.usable(model, blocks, above):
            with self._from_kept(model, blocks):
                yield
            self.reused += 1
            return
        if not hint:
            yield
            return
        low = _lowest(hooked_modules(model), blocks, above)
        start = hint if low is None else min(hint, low)
        if start <= 0:
            yield
            return
        kept = KeptInputs(start, lower_digest(model, blocks, start), templates=[None] * start)
        with self._keeping(model, blocks, kept):
            yield
        self.kept = kept

    @staticmethod
    @contextmanager
    def _keeping(model: nn.Module, blocks: list[str], kept: KeptInputs) -> Iterator[None]:
        def keep_input(_m, args, kwargs):
            # a copy: a block that wrote into its input in place would otherwise change what is kept
            kept.inputs.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

        def keep_template(i: int):
            def hook(_m, _args, out):
                kept.templates[i] = (None, *out[1:]) if isinstance(out, tuple) else None
            return hook

        handles = [model.get_submodule(blocks[kept.start]).register_forward_pre_hook(keep_input, with_kwargs=True)]
        handles += [model.get_submodule(blocks[i]).register_forward_hook(keep_template(i)) for i in range(kept.start)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def _from_kept(self, model: nn.Module, blocks: list[str]) -> Iterator[None]:
        k = self.kept
        assert k is not None
        calls = iter(range(len(k.inputs)))

        def passthrough(template):
            return lambda *a, **kw: _restructure(template, a[0] if a else kw["hidden_states"])

        first = model.get_submodule(blocks[k.start])
        original = first.forward

        def from_kept(*a, **kw):
            i = next(calls, None)
            if i is None:
                raise RuntimeError("block_inputs: more forwards than when the inputs were kept")
            seen, held = a[0] if a else kw["hidden_states"], k.inputs[i]
            if seen.shape != held.shape:
                raise RuntimeError(f"block_inputs: forward {i} has hidden states {tuple(seen.shape)}, the kept "
                                   f"ones {tuple(held.shape)}: not the same sequence of forwards")
            return _on_hidden(original, held)(*a, **kw)

        repl = {model.get_submodule(blocks[i]): passthrough(k.templates[i]) for i in range(k.start)}
        repl[first] = from_kept
        with override_forward(repl):
            yield
        if next(calls, None) is not None:
            raise RuntimeError("block_inputs: fewer forwards than when the inputs were kept")
