"""Finding, checking and caching the data files the readers decode (MNIST IDX, Omniglot zips).

Nothing here touches the network: the files must already be on disk, and every error says which
file is missing or damaged and where a user gets it.

**Where.** The data directory is the one passed (``--data DIR`` on the command line), else
``$L2O_DATA`` (:func:`resolve_data_dir`). A data set's files are looked for in ``DIR/<subdir>/``
first, then in ``DIR`` itself; all of a set must sit in the same directory (:func:`locate`).

**Verify.** Files are hashed in 1 MiB blocks (:func:`file_hashes`, never read whole for this) and
compared with the published checksums by the reader; :func:`checksum_mismatch` words the error.

**Cache.** Decoded arrays are kept twice: in-process, keyed by the identity of the files they came
from (:class:`Memo`, :func:`file_key`: path, mtime, size; a second read of an unchanged file
neither hashes nor decodes it), and on disk as an uncompressed ``.npz`` named after the file's
sha256 under :func:`l2o.cache.default_cache_dir` (:func:`cached_arrays`), so a changed file never
reads a stale cache. Cache files are written atomically (:func:`l2o.fileio.atomic_write`); an
unreadable or inconsistent one is rebuilt, an unwritable cache directory only warns.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from l2o.cache import default_cache_dir
from l2o.fileio import atomic_write

__all__ = [
    "DataError",
    "DATA_ENV_VAR",
    "DataSource",
    "Wanted",
    "resolve_data_dir",
    "locate",
    "file_hashes",
    "checksum_mismatch",
    "file_key",
    "Memo",
    "check_cache_dir",
    "resolve_cache_dir",
    "cached_arrays",
]

DATA_ENV_VAR = "L2O_DATA"
"""Environment variable naming the data directory when none is passed."""

_BLOCK = 1 << 20


class DataError(ValueError):
    """A data file is missing, malformed, or does not match its published checksum."""


class DataSource(NamedTuple):
    """A data set as users get it.

    Attributes:
        title: its name in messages (``"MNIST"``).
        subdir: the folder of ``DIR`` searched before ``DIR`` itself (``"mnist"``).
        how_to_get: where a user gets the files and where to put them (one or more sentences).
    """

    title: str
    subdir: str
    how_to_get: str


class Wanted(NamedTuple):
    """One file :func:`locate` needs: any of ``names`` (first found wins), called ``label`` in messages."""

    label: str
    names: tuple[str, ...]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None, sources: Sequence[DataSource] = ()) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$L2O_DATA``.

    Args:
        data_dir: an explicit directory, or None (or ``""``) to use the ``L2O_DATA`` environment
            variable.
        sources: the data sets the caller reads; the error says how to get each.

    Returns:
        The directory as a ``Path`` (``~`` expanded). Its existence is not checked here; the
        readers report missing files with every directory they searched.

    Raises:
        DataError: neither is set; the message says how to set one and where to get the data.
    """
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a directory path (str or os.PathLike) or None, got "
                        f"{type(data_dir).__name__} ({data_dir!r})")
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV_VAR, "")
    if env:
        return Path(env).expanduser()
    raise DataError(
        "No data directory given: pass --data DIR (data_dir=DIR from Python) or set the "
        f"{DATA_ENV_VAR} environment variable to a directory holding the data sets."
        + "".join(f" {s.title}: {s.how_to_get}" for s in sources)
    )


def _first_file(directory: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def locate(root: Path, source: DataSource, wanted: Sequence[Wanted | str], *, what: str) -> list[Path]:
    """Find every ``wanted`` file in one directory: ``root/<source.subdir>`` first, then ``root``.

    Args:
        root: the data directory (see :func:`resolve_data_dir`).
        source: the data set (its subfolder and how to get it).
        wanted: the files, each a :class:`Wanted` or one exact file name.
        what: what the files are, for the message (``"MNIST train files"``).

    Returns:
        The files' paths, in the order of ``wanted``.

    Raises:
        DataError: no directory holds them all; the message lists, per directory searched, the
            files it lacks (or that it does not exist), then ``source.how_to_get``.
    """
    items = [w if isinstance(w, Wanted) else Wanted(w, (w,)) for w in wanted]
    searched: list[str] = []
    for directory in (root / source.subdir, root):
        found = [_first_file(directory, w.names) for w in items]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
        missing = ", ".join(w.label for w, p in zip(items, found) if p is None)
        state = "" if directory.is_dir() else " (directory does not exist)"
        searched.append(f"  {directory}{state}: missing {missing}")
    raise DataError(
        f"{what} not found: no directory searched holds all of " + ", ".join(w.label for w in items)
        + ".\nSearched:\n" + "\n".join(searched) + f"\n{source.how_to_get}"
    )


def file_hashes(path: str | os.PathLike[str], *algorithms: str) -> tuple[str, ...]:
    """Hex digests of the file at ``path`` for each of ``algorithms`` (default ``"sha256"``),
    read once in 1 MiB blocks (md5 is allowed on FIPS systems: it only matches published sums)."""
    hashers = [hashlib.new(a, usedforsecurity=False) for a in (algorithms or ("sha256",))]
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_BLOCK), b""):
            for h in hashers:
                h.update(block)
    return tuple(h.hexdigest() for h in hashers)


def checksum_mismatch(path: Path, *, what: str, expected: str, found: str, how_to_get: str,
                      kind: str = "sha256") -> DataError:
    """The error for a file whose checksum is not a published one: the file, what was expected
    and found, and how to get the data again (or skip the check)."""
    return DataError(
        f"{path}: {kind} mismatch for {what}: expected {expected}, found {found}. The file is damaged "
        f"or is not the published data: remove it and get it again, or pass verify=False to skip this "
        f"check. {how_to_get}"
    )


def file_key(path: Path) -> tuple[str, int, int]:
    """The identity of a file's current content for the in-process caches: (resolved path,
    mtime in ns, size). Rewriting the file changes it."""
    resolved = path.resolve()
    stat = resolved.stat()
    return (str(resolved), stat.st_mtime_ns, stat.st_size)


class Memo:
    """A small thread-safe LRU of decoded data, for the life of the process.

    Keys are built from :func:`file_key` of the files the value came from, so an unchanged file
    is served from memory and a changed one is read again.
    """

    def __init__(self, maxsize: int = 8) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Any | None:
        """The value stored under ``key`` (now the most recently used), or None."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        """Store ``value``, dropping the least recently used entries beyond ``maxsize``."""
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.maxsize:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget everything (disk caches stay)."""
        with self._lock:
            self._items.clear()


def check_cache_dir(cache_dir: Any) -> None:
    """``cache_dir`` must be a directory path, None (the default cache) or False (no disk cache)."""
    if cache_dir is not None and not isinstance(cache_dir, (bool, str, os.PathLike)):
        raise TypeError(f"cache_dir must be a directory path, None (the default cache) or False (no cache), got "
                        f"{type(cache_dir).__name__} ({cache_dir!r})")


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None | bool) -> Path | None:
    """The disk cache directory: None or True mean :func:`l2o.cache.default_cache_dir`, False none."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return default_cache_dir()
    return Path(cache_dir).expanduser()


def _load_cached(file: Path, names: Sequence[str],
                 valid: Callable[[Mapping[str, np.ndarray]], bool]) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when absent or unusable (they are then rebuilt)."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in names}
    except Exception:  # noqa: BLE001 - any unreadable cache file (or one missing an array) is rebuilt
        return None
    return arrays if valid(arrays) else None


def cached_arrays(file: Path | None, build: Callable[[], Mapping[str, np.ndarray]], *, names: Sequence[str],
                  valid: Callable[[Mapping[str, np.ndarray]], bool], what: str) -> dict[str, np.ndarray]:
    """Arrays from the cache ``file`` (a ``.npz``), else ``build()`` them and write the file.

    Args:
        file: the cache file, named after the checksum of the data it decodes (None: no disk
            cache, always build).
        build: decodes the data: a mapping of ``names`` to arrays (no object arrays).
        names: the arrays the file must hold.
        valid: whether arrays read from the file are usable (shapes, dtypes); else they are rebuilt.
        what: the data, for the warning when the cache cannot be written (``"Omniglot"``).

    Returns:
        The arrays, by name.
    """
    if file is not None:
        arrays = _load_cached(file, names, valid)
        if arrays is not None:
            return arrays
    arrays = dict(build())
    if file is not None:
        try:
            atomic_write(file, lambda f: np.savez(f, **arrays))
        except OSError as exc:
            warnings.warn(f"could not write the {what} cache {file} ({exc}); decoding again next time",
                          RuntimeWarning, stacklevel=3)
    return arrays
