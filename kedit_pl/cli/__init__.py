"""The Hydra entry points, as console scripts (pyproject: kedit-edit, kedit-train, kedit-locate, kedit-trace) and
behind the thin scripts at the repository root (edit.py, train.py, locate.py, trace.py). The configs come through
the package (kedit_pl/config.py: the wheel's kedit_pl/conf, or the clone's conf/); add your own with
`hydra.searchpath=[file://DIR]` (docs/adding_a_method.md)."""
from kedit_pl.config import CONF_DIR
from kedit_pl.models.resolvers import register

register()  # conf/model/hf.yaml's resolvers: hydra.run.dir interpolates ${model.name} before any model loads

#: absolute, so the same entry point works from a wheel, a clone, and any working directory
CONFIG_PATH = str(CONF_DIR)
