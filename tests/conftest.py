"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The repository is checked out next to `shared/` (locally and in CI): <parent>/shared/data.
SHARED_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


def _is_shared_data(directory: Path) -> bool:
    """A copy of shared/data: its README and checksum list sit next to the data sets."""
    return (directory / "README.md").is_file() and (directory / "SHA256SUMS").is_file()


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The shared real-data directory (MNIST, Omniglot): ``../shared/data``, else ``$L2O_DATA``
    when it holds a copy of it; skips, or fails on CI, when neither does."""
    if SHARED_DATA_DIR.is_dir():
        return SHARED_DATA_DIR
    env = Path(os.environ.get("L2O_DATA", "") or SHARED_DATA_DIR).expanduser()
    if _is_shared_data(env):
        return env
    message = (
        f"shared/data missing: expected the shared datasets at {SHARED_DATA_DIR} "
        "(check out the repository next to shared/, or set L2O_DATA to a copy of it)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _restore_process_wide_torch_settings():
    """The CLI applies process-wide CPU settings (threads, flushing denormals to zero) when it runs
    in-process; undo them after each test so that later tests see torch's defaults."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)
