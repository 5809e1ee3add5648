"""The package as a user installs it: build the wheel, install it into a fresh virtual environment, and run the
console scripts from a folder outside the clone (configs and sample data come from the wheel), with a method of
the user's own added through Hydra's search path (docs/adding_a_method.md)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kedit_pl.config import REPO_ROOT

pytestmark = pytest.mark.slow  # builds a wheel and a virtual environment, then two edit runs (about 2 minutes)

MY_METHOD = '''
"""A method living outside kedit_pl: FT-L that also reports how far it moved the weights."""
from kedit_pl.methods.ft import FineTune


class MeasuredFT(FineTune):
    def compute_edit(self, requests):
        names = set(self.edited_parameters(requests))
        before = {n: p.detach().clone() for n, p in self.model.named_parameters() if n in names}
        info = super().compute_edit(requests)
        info["delta_norm"] = sum(float((p.detach() - before[n]).norm()) for n, p in self.model.named_parameters()
                                 if n in names)
        return info
'''

MY_CONFIG = """
# conf/method/ft_l.yaml of the installed package, with this package's class
defaults:
  - ft_l
  - _self_
_target_: my_pkg.my_method.MeasuredFT
name: my_method
"""


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh venv (torch & co. from the system site-packages) holding the wheel built from this clone."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"  # a clean copy: an in-tree build/ folder may hold files the clone no longer has
    shutil.copytree(REPO_ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "outputs", "multirun", "wandb", "*.egg-info", "__pycache__", ".venv", ".*cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(root / "dist"), str(src)], check=True, cwd=root)
    (wheel,) = (root / "dist").glob("kedit_pl-*.whl")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(env_dir)], check=True)
    subprocess.run([str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    str(wheel)], check=True)
    return env_dir


def run(venv: Path, cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KEDIT_DATA_DIR")}
    return subprocess.run([str(venv / "bin" / args[0]), *args[1:]], cwd=cwd, capture_output=True, text=True,
                          env=base | {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"} | (env or {}), timeout=900)


@pytest.fixture
def outside(tmp_path) -> Path:
    """A working folder with no clone and no ../shared/data beside it."""
    work = tmp_path / "user" / "work"
    work.mkdir(parents=True)
    return work


def test_the_installed_package_is_the_wheel(venv, outside):
    got = run(venv, outside, "python", "-c", "import kedit_pl, kedit_pl.config as c; "
              "print(kedit_pl.__file__); print(c.CONF_DIR); print(c.IN_CLONE)")
    assert got.returncode == 0, got.stderr
    file, conf, in_clone = got.stdout.split()
    assert file.startswith(str(venv)) and conf == str(Path(file).parent / "conf") and in_clone == "False"
    assert not file.startswith(str(REPO_ROOT))


def test_kedit_edit_runs_from_anywhere_on_the_bundled_sample(venv, outside):
    got = run(venv, outside, "kedit-edit", "model=tiny_llama", "dataset.limit=2", "logger=csv",
              "hydra.run.dir=run")
    assert got.returncode == 0, got.stderr[-3000:]
    assert "using the 10-record CounterFact and zsRE samples bundled in" in got.stdout + got.stderr
    summary = json.loads((outside / "run" / "summary.json").read_text())
    assert summary["post"]["n_records"] == 2 and summary["run"]["method"] == "ft_l"


def test_a_method_of_ones_own_through_the_search_path(venv, outside):
    (outside / "my_pkg").mkdir()
    (outside / "my_pkg" / "__init__.py").write_text("")
    (outside / "my_pkg" / "my_method.py").write_text(textwrap.dedent(MY_METHOD))
    (outside / "my_conf" / "method").mkdir(parents=True)
    (outside / "my_conf" / "method" / "my_method.yaml").write_text(MY_CONFIG)
    got = run(venv, outside, "kedit-edit", "hydra.searchpath=[file://my_conf]", "method=my_method",
              "model=tiny_llama", "dataset.limit=2", "logger=csv", "hydra.run.dir=run",
              env={"PYTHONPATH": str(outside)})
    assert got.returncode == 0, got.stderr[-3000:]
    summary = json.loads((outside / "run" / "summary.json").read_text())
    assert summary["post"]["n_records"] == 2 and summary["run"]["method"] == "my_method"
    assert summary["edit_info"]["delta_norm"] > 0  # reported by the user's class, so it ran
    assert "_target_: my_pkg.my_method.MeasuredFT" in (outside / "run" / ".hydra" / "config.yaml").read_text()
