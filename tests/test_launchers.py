"""Sweeps beyond one process: an Optuna sweep on the joblib launcher, the SLURM launcher's job, submitit locally."""
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from kedit_pl.config import CONF_DIR, REPO_ROOT

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TINY = ["model=tiny_llama", "dataset.limit=1", "logger=csv"]


def edit_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(REPO_ROOT / "edit.py"), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO_ROOT)


@pytest.mark.slow  # five processes (the sweep and two joblib workers, twice): 30-90 s
def test_optuna_sweep_on_joblib_runs_two_trials_at_a_time(tmp_path):
    sweep = tmp_path / "sweep"
    p = edit_py("hparams_search=ft_l_optuna", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                "hydra.sweeper.n_trials=4", "method.steps=3", *TINY, f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr
    assert log.count("Joblib.Parallel(n_jobs=2") == 2 and "is launching 2 jobs" in log  # 2 batches of 2 trials
    assert len(list(sweep.glob("*/summary.json"))) == 4
    best = OmegaConf.load(sweep / "optimization_results.yaml")
    assert set(best.best_params) == {"method.lr", "method.norm_constraint"} and best.best_value is not None


def test_slurm_launcher_renders_an_array_job(tmp_path, monkeypatch):
    """The real SlurmLauncher, up to sbatch: the submission file holds the configured partition, GPUs, time, array."""
    import hydra
    from hydra import compose, initialize_config_dir
    from submitit.slurm.slurm import SlurmExecutor

    rendered: list[str] = []

    class Submitted(Exception):
        pass

    def fake_submit(self, command):  # what SlurmExecutor would hand to sbatch
        rendered.append(self._make_submission_file_text(command, "uid"))
        raise Submitted

    monkeypatch.setattr(SlurmExecutor, "_submit_command", fake_submit)
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun is installed"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("edit", ["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu_a100",
                               "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=90",
                               "hydra.launcher.array_parallelism=3", f"hydra.sweep.dir={tmp_path}", *TINY],
                      return_hydra_config=True)
    launcher = hydra.utils.instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    with pytest.raises(Submitted):
        launcher.launch([["method.lr=1e-4"], ["method.lr=1e-3"], ["method.lr=1e-2"], ["method.lr=1e-1"]], 0)
    (script,) = rendered
    for line in ("#SBATCH --partition=gpu_a100", "#SBATCH --gpus-per-node=2", "#SBATCH --time=90",
                 "#SBATCH --array=0-3%3", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32GB"):
        assert line in script, script


@pytest.mark.slow  # two job processes: 40 s
def test_submitit_local_runs_the_jobs(tmp_path):
    sweep = tmp_path / "sweep"
    p = edit_py("-m", "hydra/launcher=submitit_local", "method=ft", "method.lr=1e-3,1e-2", *TINY,
                f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(list(sweep.glob("*/summary.json"))) == 2
    assert list(sweep.glob(".submitit/*/*_log.out"))  # each job ran as a submitit job


SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))


@pytest.mark.parametrize("search", SEARCHES)
def test_every_sweep_config_composes_and_sweeps_existing_keys(search):
    """Each hparams_search composes with its entry point (edit.py, or train.py for trained editors), and every
    swept parameter names a key that the composed config has (a typo would silently sweep nothing)."""
    from hydra import compose, initialize_config_dir

    entry = "train" if search.split("_")[0] in ("mend", "serac") else "edit"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(entry, [f"hparams_search={search}", "model=tiny_llama"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params and cfg.hydra.sweeper.direction == "maximize"
    for key in params:
        assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", f"{search}: {key} is not a config key"
    assert cfg.method.name == search.split("_optuna")[0]
