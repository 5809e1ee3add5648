"""Shared fixtures: composed configs and tiny random-init models (no download, fast)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")

from kedit_pl.config import REPO_ROOT, compose  # noqa: E402

#: the benchmark data, found as the code finds it (conf/paths/default.yaml): $KEDIT_DATA_DIR, else ../shared/data
DATA_DIR = Path(os.environ.get("KEDIT_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")


def edit_cfg(tmp_path, *overrides: str, config_name: str = "edit"):
    """An edit/train config writing into tmp_path, CSV logging, tiny llama unless overridden."""
    base = ["model=tiny_llama", "logger=csv", f"paths.output_dir={tmp_path}", "dataset.limit=3"]
    return compose(config_name, base + list(overrides))


@pytest.fixture(scope="session")
def tiny_llama():
    from kedit_pl.models.load import load_model

    return load_model(compose("edit", ["model=tiny_llama", "paths.output_dir=/tmp"]).model)


@pytest.fixture(scope="session")
def tiny_gpt2():
    from kedit_pl.models.load import load_model

    return load_model(compose("edit", ["model=tiny_gpt2", "paths.output_dir=/tmp"]).model)


@pytest.fixture
def one_thread():
    """Tiny models run much faster on one thread, especially on a shared CPU."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` (edit/restore and training on CUDA: python -m pytest -m gpu) skip where CUDA is absent."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (a `gpu` test)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
