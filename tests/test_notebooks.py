"""The notebooks execute end to end in fast mode (``L2O_FAST=1``), and are stored without outputs.

Each notebook runs in a fresh ``python3`` kernel with nbclient, from the ``notebooks/`` directory;
an exception in any cell fails the test. The kernel is this interpreter: a kernelspec pointing at
``sys.executable`` is written to a temporary ``JUPYTER_PATH`` (which takes precedence over any
user or system ``python3`` kernel), so the test never runs another Python by accident.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401  (the kernel the notebooks run in; nbformat, nbclient, ipykernel: the dev extra)
import nbclient
import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
#: Notebooks that read the shared MNIST files (they get ``L2O_DATA`` from the ``shared_data_dir`` fixture).
NEEDS_DATA = {"02_mnist_vs_adam.ipynb"}
#: Seconds any one cell may take in fast mode before the test fails.
CELL_TIMEOUT = 300


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``JUPYTER_PATH`` holding a ``python3`` kernelspec that runs this interpreter."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (l2o tests)",
        "language": "python",
    }))
    return root


def test_notebooks_exist() -> None:
    names = {p.name for p in NOTEBOOKS}
    assert {"01_quadratic_vs_adam.ipynb", "02_mnist_vs_adam.ipynb", "03_maml_sine.ipynb",
            "04_drop_in.ipynb"} <= names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    """Reviewable in git: no outputs and no execution counts in the committed file."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: cell {i} has stored outputs; strip them before committing"
            assert cell.execution_count is None, f"{path.name}: cell {i} has an execution count; strip it"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_fast_mode(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    request: pytest.FixtureRequest) -> None:
    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.setenv("L2O_FAST", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("L2O_MNIST_RULE", raising=False)  # fast mode meta-trains its own small rule
    if path.name in NEEDS_DATA:
        monkeypatch.setenv("L2O_DATA", str(request.getfixturevalue("shared_data_dir")))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS_DIR)}})
    start = time.perf_counter()
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as exc:
        pytest.fail(f"{path.name} failed in fast mode:\n{exc}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f}s")
