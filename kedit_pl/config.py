"""Hydra/OmegaConf glue: where the configs and the data are, the resolvers the configs use, and composing configs
outside an entry point.

The configs are found through the package: an installed wheel carries them as `kedit_pl/conf` (setup.py maps the
repository's top-level `conf/` there at build time); a clone (editable install) reads `conf/` beside the package.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

PACKAGE_DIR = Path(__file__).resolve().parent
#: the configs shipped in the wheel, else those of the clone
CONF_DIR = PACKAGE_DIR / "conf" if (PACKAGE_DIR / "conf" / "edit.yaml").is_file() else PACKAGE_DIR.parent / "conf"
#: True in a clone (the package sits beside the repository's conf/), False for an installed wheel
IN_CLONE = CONF_DIR == PACKAGE_DIR.parent / "conf"
#: the repository root in a clone; for an installed package the working directory (`${paths.root}`: outputs,
#: and the `../shared/data` default beside it)
REPO_ROOT = PACKAGE_DIR.parent if IN_CLONE else Path.cwd()
#: 10 CounterFact + 10 zsRE records shipped in the package (data/sample/SOURCES.md), laid out like the data folder
SAMPLE_DATA_DIR = PACKAGE_DIR / "data" / "sample"
DATA_HELP = ("put the benchmark data in a shared/data folder beside the clone (../shared/data), or set "
             "KEDIT_DATA_DIR=DIR (DIR/counterfact, DIR/zsre, DIR/text; docs/packaging.md)")

log = logging.getLogger("kedit_pl")
_said_sample: list[bool] = []  # the fallback to the sample is said once per process

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml carry the launcher plugins' own names, so Hydra
# checks their values against the plugins' schemas (wanted); it warns that this matching is deprecated
warnings.filterwarnings("ignore", message=r"\n?'hydra/launcher/\w+' is validated against ConfigStore schema",
                        category=UserWarning)


def data_dir() -> str:
    """The benchmark data folder: $KEDIT_DATA_DIR, else ../shared/data beside the root; when neither is set up,
    the bundled 10-record sample, with a warning that says so and where the data goes."""
    env = os.environ.get("KEDIT_DATA_DIR")
    if env:
        return env
    beside = REPO_ROOT.parent / "shared" / "data"
    if beside.is_dir():
        return str(beside)
    if not _said_sample:
        _said_sample.append(True)
        log.warning("no benchmark data (KEDIT_DATA_DIR is unset and %s does not exist): using the 10-record "
                    "CounterFact and zsRE samples bundled in %s; for the full benchmarks %s", beside,
                    SAMPLE_DATA_DIR, DATA_HELP)
    return str(SAMPLE_DATA_DIR)


def missing_data(field: str, path: str | Path) -> str:
    """The one-line message for a data file that is not there: which field, which file, where the data goes."""
    path = Path(path)
    sample = SAMPLE_DATA_DIR in path.parents
    why = (f"the sample bundled in the package holds only 10 CounterFact and 10 zsRE evaluation records; {DATA_HELP}"
           if sample else DATA_HELP)
    return f"{field}: file not found: {path} ({why}; or point {field}=FILE at a file)"


def layer_at(fraction: float, n_layers: int) -> int:
    """The layer at `fraction` of a model's depth (0: the first, 1: the last): search spaces that follow the model."""
    if not 0 <= float(fraction) <= 1 or int(n_layers) < 1:
        raise ValueError(f"kedit_layer: expected a fraction in [0, 1] and a layer count >= 1, got {fraction}, {n_layers}")
    return round(float(fraction) * (int(n_layers) - 1))


def layer_window(top: int, width: int) -> list[int]:
    """The `width` consecutive layers ending at `top` (MEMIT's range R), cut at layer 0."""
    return list(range(max(0, int(top) - int(width) + 1), int(top) + 1))


# ${kedit_root:} -> the repository root (installed: the working directory), so paths work from anywhere;
# ${kedit_data_dir:} -> data_dir(); ${kedit_layer:f,n} and ${kedit_layer_window:top,w}: search spaces that follow the model
for _name, _fn in (("kedit_root", lambda: str(REPO_ROOT)), ("kedit_data_dir", data_dir),
                   ("kedit_layer", layer_at), ("kedit_layer_window", layer_window)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def compose(config_name: str = "edit", overrides: list[str] | None = None) -> DictConfig:
    """Compose a config the way the entry points do (for tests, notebooks and benches). conf/model/hf.yaml's
    resolvers are registered by kedit_pl.models.resolvers (imported wherever a model loads)."""
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
