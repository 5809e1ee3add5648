"""Where tensors live: the model's device, its free memory, and the one rule for offloading to the CPU.

Everything a method, the scoring or the statistics create goes on the model's device. The single exception is
`place`: a large tensor that would not fit in the device's free memory stays on the CPU, and says so in the log.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

#: free memory `place` leaves untouched on an accelerator (activations of the next forward, allocator slack)
HEADROOM = 0.2


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's (first) parameter."""
    return next(model.parameters()).device


def free_bytes(device: torch.device | str) -> int | None:
    """Free memory of `device` in bytes: CUDA's free memory, or the host's MemAvailable for the CPU; None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def place(tensors: dict, device: torch.device | str, what: str) -> dict:
    """`tensors` moved to `device`, unless they would take more than (1 − HEADROOM) of its free memory: then they
    stay on the CPU and the log says so (the algebra that uses them follows them there)."""
    device = torch.device(device)
    if device.type == "cpu" or not tensors:
        return dict(tensors)
    need = sum(t.numel() * t.element_size() for t in tensors.values() if t.device != device)
    free = free_bytes(device)
    if free is not None and need > (1 - HEADROOM) * free:
        log.warning("%s: %.2f GB would not fit in the %.2f GB free on %s; kept on the CPU (slower algebra)",
                    what, need / 2**30, free / 2**30, device)
        return {k: t.cpu() for k, t in tensors.items()}
    return {k: t.to(device) for k, t in tensors.items()}


#: trainer.accelerator values that place the model (Lightning's names; gpu = cuda)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")


def run_device(accelerator: str = "cpu", local_rank: int | None = None) -> torch.device:
    """The device a run with `trainer.accelerator` edits on: the model is put there right after loading, so that
    everything before the Trainer starts (the key statistics, the context templates, the record checks) already
    runs there. `auto` = CUDA, else Apple's MPS, else the CPU; `gpu` without CUDA is a one-line ConfigError.
    Under DDP each process takes the GPU of its LOCAL_RANK."""
    import os

    from kedit_pl.errors import ConfigError

    acc = str(accelerator).lower()
    if acc not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator: {accelerator!r} is not one of {', '.join(ACCELERATORS)}")
    rank = int(os.environ.get("LOCAL_RANK", 0)) if local_rank is None else local_rank
    cuda, mps = torch.cuda.is_available(), getattr(torch.backends, "mps", None) is not None and \
        torch.backends.mps.is_available()
    if acc in ("gpu", "cuda") and not cuda:
        raise ConfigError(f"trainer.accelerator={accelerator}: no CUDA device is visible to PyTorch "
                          f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use trainer.accelerator=cpu")
    if acc == "mps" and not mps:
        raise ConfigError("trainer.accelerator=mps: Apple's MPS backend is not available; use trainer.accelerator=cpu")
    if acc in ("gpu", "cuda") or (acc == "auto" and cuda):
        return torch.device("cuda", rank % torch.cuda.device_count())
    if acc == "mps" or (acc == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


def place_model(model: nn.Module, device: torch.device) -> None:
    """Move the model to `device` (a meta-device skeleton, which has no weights to move, stays where it is)."""
    if model_device(model).type != "meta" and model_device(model) != device:
        log.info("model on %s", device)
        model.to(device)
