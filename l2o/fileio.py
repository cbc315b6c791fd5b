"""Atomic file writes: after a crash a file holds either its previous content or its new content.

Every file l2o writes (checkpoints, training states, decoded-data caches, compiled kernels) goes
through one routine:

1. the new content is written to a fresh temporary file in the target's own directory (so the
   rename below never crosses file systems), created with ``O_EXCL`` (never writing through a file
   or link someone else put there) and mode ``0o666 & ~umask``, like a file made by ``open()``;
2. the temporary file is flushed and fsynced, so its data is on disk before it gets the name;
3. it is renamed over the target with :func:`os.replace` (atomic on POSIX and Windows);
4. the directory is fsynced, so the rename itself survives a power loss.

A crash before step 3 leaves the previous file untouched and at worst a stray
``.<name>.<pid>.<random>.tmp`` next to it; an exception removes the temporary file.

:func:`atomic_write` hands the writer an open binary file (``torch.save``, ``np.savez``);
:func:`atomic_write_path` hands it the temporary file's path (a compiler's ``-o``). Code whose
control flow needs the two halves apart uses :func:`reserve_temp` and :func:`commit_temp`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

__all__ = ["atomic_write", "atomic_write_path", "reserve_temp", "commit_temp", "fsync_directory"]

_BINARY = getattr(os, "O_BINARY", 0)


def _target(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"cannot write to {str(path)!r}: it is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty temporary file next to ``path``: its descriptor (open for writing) and path."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _BINARY, 0o666), tmp


def _discard(tmp: Path) -> None:
    try:
        os.unlink(tmp)
    except OSError:
        pass


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it is durable (POSIX; a no-op where unsupported)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory (EINVAL); the data itself is synced
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` atomically: ``write(fh)`` fills a temporary binary file (see the module doc).

    The parent directory is created if needed. Returns ``path`` as a :class:`~pathlib.Path`.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the directory cannot be written; anything ``write`` raises passes through. The
            previous file is then untouched and the temporary file removed.
    """
    path = _target(path)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    fsync_directory(path.parent)
    return path


def reserve_temp(path: str | os.PathLike[str]) -> Path:
    """Create the empty temporary file for a new ``path`` (step 1) and return its path.

    Whatever writes it may also replace it (a linker unlinks and recreates its output). Finish
    with :func:`commit_temp`, or delete the file on failure.

    Raises:
        IsADirectoryError: ``path`` is a directory.
        OSError: the directory cannot be created or written.
    """
    fd, tmp = _create_temp(_target(path))
    os.close(fd)
    return tmp


def commit_temp(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """fsync the written temporary file ``tmp``, rename it over ``path`` and fsync the directory
    (steps 2-4); returns ``path`` as a :class:`~pathlib.Path`."""
    tmp, path = Path(tmp), Path(path)
    fd = os.open(tmp, (os.O_RDONLY if os.name == "posix" else os.O_RDWR) | _BINARY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_directory(path.parent)
    return path


def atomic_write_path(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` writes the temporary file at path ``tmp`` (which
    exists, empty, when it is called; see the module doc). Returns ``path`` as a
    :class:`~pathlib.Path`; on any exception the temporary file is removed and ``path`` untouched.
    """
    tmp = reserve_temp(path)
    try:
        write(tmp)
        return commit_temp(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
