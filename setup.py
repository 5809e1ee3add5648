"""Build hook (all metadata is in pyproject.toml): the configs at the repository's top, conf/, ship inside the wheel
as kedit_pl/conf, where kedit_pl/config.py looks first. An editable install keeps reading conf/ from the clone."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    """build_py, plus conf/**/*.yaml copied to <build>/kedit_pl/conf/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        files = sorted(CONF.rglob("*.yaml"))
        if not files:
            raise SystemExit(f"setup.py: no configs under {CONF}; conf/ must ship in the wheel")
        target = Path(self.build_lib) / "kedit_pl" / "conf"
        for src in files:
            dst = target / src.relative_to(CONF)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithConf})
