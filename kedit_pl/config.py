"""Hydra/OmegaConf glue: resolvers the configs use, and composing configs outside an entry point."""
from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = REPO_ROOT / "conf"

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml carry the launcher plugins' own names, so Hydra
# checks their values against the plugins' schemas (wanted); it warns that this matching is deprecated
warnings.filterwarnings("ignore", message=r"\n?'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)
import kedit_pl.models.infer  # noqa: E402,F401  (registers ${kedit_hf_arch:...} and friends for conf/model/hf.yaml)



def layer_at(fraction: float, n_layers: int) -> int:
    """The layer at `fraction` of a model's depth (0: the first, 1: the last): search spaces that follow the model."""
    if not 0 <= float(fraction) <= 1 or int(n_layers) < 1:
        raise ValueError(f"kedit_layer: expected a fraction in [0, 1] and a layer count >= 1, got {fraction}, {n_layers}")
    return round(float(fraction) * (int(n_layers) - 1))


def layer_window(top: int, width: int) -> list[int]:
    """The `width` consecutive layers ending at `top` (MEMIT's range R), cut at layer 0."""
    return list(range(max(0, int(top) - int(width) + 1), int(top) + 1))


for _name, _fn in (("kedit_root", lambda: str(REPO_ROOT)),  # the repository root: data paths work from anywhere
                   ("kedit_layer", layer_at), ("kedit_layer_window", layer_window)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def compose(config_name: str = "edit", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config the way the entry points do (for tests, notebooks and benches)."""
    from hydra import compose as _compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from kedit_pl.errors import ConfigError

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return _compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)
        except MissingConfigException as e:  # Hydra's message is a page long; ours is the line edit.py would need
            group, _, name = (e.missing_cfg_file or "").rpartition("/")
            if not group or not e.options:
                raise
            raise ConfigError(f"{group}: no config {name!r} in {CONF_DIR / group} (available: "
                              f"{', '.join(e.options)})") from None
