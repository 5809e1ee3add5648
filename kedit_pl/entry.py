"""How an entry point (edit.py, train.py, locate.py) ends when it does not finish: the user's problem as one line
(exit 2), an interruption with the command that resumes it (exit 128 + signal), a failed sweep trial recorded by
the sweeper while the study goes on. `pipeline.cli` applies these rules; `CheckOutputFolder` is the Hydra callback
that checks the output folder before Hydra creates it.
"""
from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from kedit_pl.errors import KEditError
from kedit_pl.io import folder_problem

#: the flag that continues an interrupted run, per `task`
RESUME_FLAG = {"edit": "edit.resume", "train": "train.resume", "locate": "resume"}
#: overrides a resume command replaces
RESUME_DROPS = ("edit.resume", "edit.overwrite", "train.resume", "resume", "hydra.run.dir")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. Not a KeyboardInterrupt: Lightning turns that into a silent `exit(1)`, while any
    other BaseException goes through its teardown and on to us."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class TrialFailed(Exception):
    """A sweep trial ended with a user error: raised (not exit 2) so the launcher returns it to a sweeper that
    tolerates failures (`in_tolerant_sweep`), which records the trial as failed with this message and goes on."""


def kedit_cause(e: BaseException) -> KEditError | None:
    """`e` itself, or the KEditError that an OmegaConf error wraps: a resolver's ConfigError reaches us inside
    InterpolationResolutionError (as its `__context__`: OmegaConf drops `__cause__`). Other exceptions: None."""
    from omegaconf.errors import OmegaConfBaseException

    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KEditError):
            return e
        if not isinstance(e, OmegaConfBaseException):
            return None
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class interrupts:
    """Context manager: SIGINT and SIGTERM raise `Interrupted` (main thread only); the old handlers come back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "interrupts":
        self._old: dict[int, Any] = {}
        if _main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        for s in interrupts.SIGNALS:  # a second Ctrl+C must not cut the clean-up short
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def resume_command(cfg: DictConfig, out: Path) -> str | None:
    """The command line that continues the run in `out` (None: this task cannot resume)."""
    flag = RESUME_FLAG.get(str(cfg.get("task")))
    if flag is None:
        return None
    script = f"{cfg.task}.py"
    if sys.argv and Path(sys.argv[0]).name == script:
        script = sys.argv[0]  # as it was started (another working directory: its path)
    kept = [o for o in _task_overrides() if o.split("=", 1)[0].lstrip("+~") not in RESUME_DROPS]
    return shlex.join(["python", script, *kept, f"{flag}=true", f"hydra.run.dir={out}"])


def _task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def in_tolerant_sweep() -> bool:
    """True inside a trial of a sweep whose sweeper records failed trials and goes on (`max_failure_rate` > 0:
    the Optuna sweeper of conf/hparams_search). Hydra's basic sweeper (`-m a=1,2`) stops at a failed job."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    return float(HydraConfig.get().sweeper.get("max_failure_rate") or 0) > 0


class CheckOutputFolder(Callback):
    """conf/hydra/default.yaml: refuse an output folder that is a file (Hydra would fail with a traceback on its
    mkdir), in one line and with exit 2, before Hydra writes anything."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.run.dir", config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check("hydra.sweep.dir", config.hydra.sweep.dir)

    @staticmethod
    def _check(field: str, path: str) -> None:
        problem = folder_problem(path)
        if problem:
            print(f"error: {field}: {problem}; pick another {field}", file=sys.stderr)
            sys.exit(2)
