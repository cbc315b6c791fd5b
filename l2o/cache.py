"""Where l2o keeps files it can rebuild: decoded datasets, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "default_cache_dir"]

#: Environment variable naming the cache directory.
CACHE_ENV_VAR = "L2O_CACHE"


def default_cache_dir() -> Path:
    """``$L2O_CACHE``, else ``$XDG_CACHE_HOME/l2o``, else ``~/.cache/l2o``."""
    env = os.environ.get(CACHE_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "l2o"
