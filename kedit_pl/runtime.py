"""The Lightning pieces a config names: the run folder, the loggers and the Trainer (used by pipeline.py and by
the teaching run of locate/influence/teach.py, which sits below the pipeline)."""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from omegaconf import DictConfig

from kedit_pl.distributed import strategy_for


def output_dir(cfg: DictConfig) -> Path:
    """The run folder (`hydra.run.dir`, through `paths.output_dir`)."""
    return Path(cfg.paths.output_dir)


def build_loggers(cfg: DictConfig) -> list:
    """Every logger of `cfg.logger` that names a `_target_`."""
    loggers = []
    for lg_cfg in (cfg.get("logger") or {}).values():
        if lg_cfg is not None and "_target_" in lg_cfg:
            loggers.append(hydra.utils.instantiate(lg_cfg))
    return loggers


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of `cfg.trainer`. The data module chooses each DDP rank's share itself (the same batches as one
    process), so Lightning's DistributedSampler stays out."""
    return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks + progress_bar(), logger=loggers or False,
                                   strategy=strategy_for(cfg.trainer), use_distributed_sampler=False)


def progress_bar() -> list:
    """Rich's progress bar, except in a Jupyter kernel, which gets tqdm's: rich's live display redirects stdout
    there, and a print during a run (the results table) recursed until Python gave up."""
    ipython = sys.modules.get("IPython")
    in_kernel = ipython is not None and hasattr(ipython.get_ipython(), "kernel")
    return [TQDMProgressBar() if in_kernel else RichProgressBar()]


def finish_loggers(loggers: list) -> None:
    """Finalize the loggers (and close the W&B run)."""
    for lg in loggers:
        lg.finalize("success")
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
