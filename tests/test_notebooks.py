"""The notebooks in examples/ run top to bottom on the tiny models (each asserts what it shows: an edit that takes
and reverts bit-exactly, a trace of the right shape, a head-to-head folder with every method's files)."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "examples").glob("*.ipynb"))
FIGURES = {"causal_tracing.ipynb": 4, "head_to_head_folder.ipynb": 2}  # the heatmaps and plots each one shows


def test_the_three_notebooks_are_there():
    assert {p.name for p in NOTEBOOKS} >= {"edit_generate_revert.ipynb", "causal_tracing.ipynb",
                                           "head_to_head_folder.ipynb"}


def execute(path: Path) -> nbformat.NotebookNode:
    """Run the notebook in a fresh kernel, in the repository root, importing this checkout's kedit_pl."""
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    return nb


@pytest.fixture(scope="module")
def executed():
    """Every notebook, started at once in its own kernel (mostly importing torch: the second core helps), so each
    test below only waits for its own."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "OMP_NUM_THREADS")}
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    os.environ["OMP_NUM_THREADS"] = "1"  # tiny models run fastest on one thread
    try:
        with ThreadPoolExecutor(len(NOTEBOOKS)) as pool:
            futures = {p.name: pool.submit(execute, p) for p in NOTEBOOKS}
            yield futures
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, executed):
    stored = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code"), "store notebooks without outputs"
    nb = executed[path.name].result()  # a failing cell raises CellExecutionError here, with its traceback
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= FIGURES.get(path.name, 0), f"{path.name} shows {len(images)} figure(s)"


def test_runs_in_a_jupyter_kernel_use_tqdms_progress_bar(monkeypatch):
    """Rich's live progress display (Lightning's default when rich is installed) redirects stdout; in a Jupyter kernel
    a print during the run (the results table) recursed without end, so `run_edit` and `run_head_to_head` crashed in
    a notebook (the head-to-head notebook above runs one)."""
    import IPython
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    from kedit_pl.runtime import progress_bar

    assert [type(c) for c in progress_bar()] == [RichProgressBar]
    monkeypatch.setattr(IPython, "get_ipython", lambda: type("Shell", (), {"kernel": object()})())
    assert [type(c) for c in progress_bar()] == [TQDMProgressBar]
