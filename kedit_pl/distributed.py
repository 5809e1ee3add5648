"""Runs over several processes with Lightning's DDP strategy (`trainer.devices=N trainer.strategy=ddp`).

Lightning's launcher starts ranks 1..N-1 by re-running the entry script (with Hydra's run dir, so every rank shares
the parent's one folder); everything here is bookkeeping around that:
- up-front checks of the request (devices the machine has, a supported strategy, a single Hydra run);
- which share of a list each rank takes (`share`);
- gathering per-rank results through the strategy's own collectives (`broadcast` for Python objects, `all_gather`
  for tensors), and checking that ranks which must hold the same weights do.
"""
from __future__ import annotations

import hashlib
import os
import traceback
from datetime import timedelta
from typing import Any, Sequence, TypeVar

import torch
from omegaconf import DictConfig, ListConfig

from kedit_pl.errors import ConfigError, RankFailed

T = TypeVar("T")
#: strategies whose launcher re-runs the script (one Hydra job, ranks share its folder); spawn/fork would pickle
#: the run's objects into workers whose results never reach the run folder
SUPPORTED = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
#: how long a rank may wait at a collective for the slowest one (MEMIT's z groups or a rank's last batch can take
#: hours on CPU; a rank that fails ends the run at once through Lightning's process observer, not by this timeout)
TIMEOUT = timedelta(hours=24)


def launched_rank() -> int:
    """This process's global rank as the launcher set it (0 in the process the user started), readable before any
    Trainer exists: Lightning's own `rank_zero_only.rank`, taken from RANK / LOCAL_RANK / SLURM_PROCID."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_worker() -> bool:
    """True in a process Lightning's launcher started for a rank > 0 (it must not claim, clean or write the folder)."""
    return launched_rank() != 0


def _available(accelerator: str) -> tuple[int, str]:
    """(devices this process can use, what they are) for `accelerator`."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.device_count(), "CUDA GPU(s)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores, "CPU core(s) available to this process (os.sched_getaffinity)"


def requested_devices(trainer_cfg: Any) -> int | None:
    """Number of processes `trainer.devices` asks for (None: 'auto' / -1, Lightning decides)."""
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, str):
        text = devices.strip()
        if text in ("auto", "-1"):
            return None
        devices = [d for d in text.split(",") if d.strip()] if "," in text else text
    if isinstance(devices, (list, tuple, ListConfig)):
        return len(devices)
    try:
        n = int(devices)
    except (TypeError, ValueError):
        raise ConfigError(f"trainer.devices: expected a number of processes, got {devices!r}") from None
    if n == -1:
        return None
    if n < 1:
        raise ConfigError(f"trainer.devices: must be >= 1 (or -1 / 'auto'), got {n}")
    return n


def check_request(cfg: DictConfig) -> int:
    """One-line errors, before anything loads, for a multi-process request this run cannot honour; returns the number
    of processes asked for (1 without DDP)."""
    t = cfg.trainer
    n = requested_devices(t)
    if n is None or n == 1:
        return 1
    accelerator = str(t.get("accelerator", "auto"))
    have, what = _available(accelerator)
    if n > have:
        raise ConfigError(f"trainer.devices: {n} processes asked for, but this machine has {have} {what}; "
                          f"use trainer.devices<={have}")
    strategy = t.get("strategy", "auto")
    if not isinstance(strategy, str) or strategy not in SUPPORTED:
        raise ConfigError(f"trainer.strategy: {strategy!r} with trainer.devices={n}; runs over several processes need "
                          f"trainer.strategy=ddp (Lightning re-launches this script per rank)")
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        raise ConfigError(f"trainer.devices={n}: multi-process runs start from edit.py / train.py (Lightning re-runs "
                          f"the command line per rank), not from Python; use trainer.devices=1 here")
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(f"trainer.devices={n}: a multi-process run is one Hydra job and cannot run inside a multirun "
                          f"(-m); spread a sweep with hydra/launcher=joblib or submitit instead")
    return n


def strategy_for(trainer_cfg: Any) -> Any:
    """The Trainer's `strategy` argument: Lightning's DDPStrategy with a long collective timeout for the names in
    SUPPORTED, anything else unchanged (single-process runs)."""
    name = trainer_cfg.get("strategy", "auto")
    if not isinstance(name, str) or name not in SUPPORTED or (requested_devices(trainer_cfg) or 2) == 1:
        return name
    from lightning.pytorch.strategies import DDPStrategy

    return DDPStrategy(timeout=TIMEOUT, find_unused_parameters=name == "ddp_find_unused_parameters_true")


def rank_world(trainer: Any) -> tuple[int, int]:
    """(global rank, world size) of a Trainer, (0, 1) without one (or for a stand-in without those attributes)."""
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def share(items: Sequence[T], rank: int, world: int) -> list[T]:
    """This rank's share, round-robin: items rank, rank + world, ... (balances uneven costs along the list)."""
    return list(items[rank::world])


def gather_objects(strategy: Any, obj: T) -> list[T]:
    """Every rank's `obj` (picklable), in rank order, on every rank: one strategy.broadcast per source rank."""
    world = int(getattr(strategy, "world_size", 1))
    if world == 1:
        return [obj]
    return [strategy.broadcast(obj, src=r) for r in range(world)]


def gather_rows(strategy: Any, rows: dict[str, torch.Tensor] | None, index: Sequence[int], n: int,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Row-aligned tensors computed in shares (this rank holds rows `index` of `n`) -> the full (n, ...) tensors on
    every rank, through the strategy's all_gather (rows padded to the largest share; a rank with no rows passes None)."""
    meta = gather_objects(strategy, None if rows is None else
                          {k: (tuple(v.shape[1:]), v.dtype) for k, v in rows.items()} | {"_index": list(index)})
    shapes = next((m for m in meta if m is not None), None)
    if shapes is None:
        raise ValueError("gather_rows: no rank computed any rows")
    width = max(len(m["_index"]) if m else 0 for m in meta)
    out: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in ((k, v) for k, v in shapes.items() if k != "_index"):
        mine = torch.zeros((width, *shape), dtype=dtype, device=device)
        if rows is not None and len(index):
            mine[: len(index)] = rows[key].to(device)
        every = strategy.all_gather(mine)  # (world, width, ...)
        full = torch.empty((n, *shape), dtype=dtype, device=device)
        for r, m in enumerate(meta):
            if m and m["_index"]:
                full[torch.tensor(m["_index"], device=device)] = every[r, : len(m["_index"])]
        out[key] = full
    return out


def params_digest(model: torch.nn.Module, names: Sequence[str]) -> str:
    """Digest of the exact bytes of the named parameters."""
    h = hashlib.blake2b(digest_size=16)
    params = dict(model.named_parameters())
    for n in names:
        h.update(memoryview(params[n].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@torch.no_grad()
def agree_on_parameters(strategy: Any, model: torch.nn.Module, names: Sequence[str]) -> bool:
    """Make every rank hold rank 0's values of the named parameters. Ranks that computed the same edit from the same
    inputs already agree bit for bit (checked by digest); if a nondeterministic kernel made them differ, rank 0's
    values are broadcast. Returns True if they had to be copied."""
    if int(getattr(strategy, "world_size", 1)) == 1:
        return False
    digests = gather_objects(strategy, params_digest(model, names))
    if len(set(digests)) == 1:
        return False
    params = dict(model.named_parameters())
    for n in names:
        params[n].copy_(strategy.broadcast(params[n].detach().cpu(), src=0).to(params[n].device))
    return True


def collective_error(exc: BaseException) -> RankFailed | None:
    """A collective that failed (a peer rank died: "Connection closed by peer", NCCL errors) as a one-line error;
    None for any other exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames or "torch/distributed" not in frames[-1].filename.replace("\\", "/"):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return RankFailed(f"another DDP rank failed (its error is printed above), so this one stopped at a collective: "
                      f"{first[:160]}")


def stop_workers(trainer: Any) -> None:
    """Rank 0 failed: end the ranks Lightning's launcher started (as Lightning itself does on Ctrl-C), so none keeps
    computing for a run that is over. (A failing rank > 0 ends rank 0 through Lightning's process observer.)"""
    import signal

    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    if launcher is not None and getattr(launcher, "procs", None):
        launcher.kill(signal.SIGKILL)
