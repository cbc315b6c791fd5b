"""Tests for l2o.fileio: the one atomic writer behind checkpoints, data caches and kernel builds."""

from __future__ import annotations

import ctypes
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from l2o import fileio, kernels
from l2o.fileio import atomic_write, atomic_write_path, commit_temp, fsync_directory, reserve_temp

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every os.fsync as "file" or "dir" (and still do it)."""
    calls: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return calls


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _strays(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_syncs_the_data_then_the_directory(tmp_path: Path, fsyncs: list[str]) -> None:
    path = atomic_write(tmp_path / "new" / "a.bin", lambda f: f.write(b"hello"))
    assert path == tmp_path / "new" / "a.bin" and path.read_bytes() == b"hello"
    assert fsyncs == ["file", "dir"]  # the data before the rename, then the rename itself
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()  # as open() would create it
    atomic_write(path, lambda f: f.write(b"again"))
    assert path.read_bytes() == b"again" and _strays(path.parent) == []


def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"old"))

    def half_then_fail(f) -> None:
        f.write(b"new, half written")
        raise RuntimeError("writer failed")

    with pytest.raises(RuntimeError, match="writer failed"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]
    with pytest.raises(IsADirectoryError, match="is a directory"):
        atomic_write(tmp_path, lambda f: f.write(b"x"))


def test_an_error_at_the_rename_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"old"))

    def no_rename(src: str, dst: str) -> None:
        raise OSError("rename failed")

    monkeypatch.setattr(os, "replace", no_rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write(path, lambda f: f.write(b"new"))
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_path(path, lambda tmp: tmp.write_bytes(b"new"))
    assert path.read_bytes() == b"old" and _strays(tmp_path) == []


_KILL_BEFORE_RENAME = textwrap.dedent("""
    import os, signal, sys
    from l2o.fileio import atomic_write

    def die(src, dst):
        os.kill(os.getpid(), signal.SIGKILL)  # the new file is complete and synced, not yet renamed

    os.replace = die
    atomic_write(sys.argv[1], lambda f: f.write(b"the new content"))
    sys.exit("not killed")
""")


def test_a_crash_between_write_and_rename_leaves_the_old_file(tmp_path: Path) -> None:
    path = atomic_write(tmp_path / "a.bin", lambda f: f.write(b"the old content"))
    script = tmp_path / "kill.py"
    script.write_text(_KILL_BEFORE_RENAME)
    proc = subprocess.run([sys.executable, str(script), str(path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert path.read_bytes() == b"the old content"
    strays = [tmp_path / name for name in _strays(tmp_path)]
    assert len(strays) == 1 and strays[0].name.startswith(".a.bin.")  # hidden, next to the target
    assert strays[0].read_bytes() == b"the new content"  # it died after the write, before the rename


def test_atomic_write_path_lets_the_writer_replace_the_temporary(tmp_path: Path, fsyncs: list[str]) -> None:
    seen = []

    def like_a_linker(tmp: Path) -> None:  # unlinks its output and creates it anew
        seen.append((tmp.parent, tmp.is_file(), tmp.stat().st_size))
        tmp.unlink()
        tmp.write_bytes(b"\x7fELF...")

    path = atomic_write_path(tmp_path / "lib.so", like_a_linker)
    assert seen == [(tmp_path, True, 0)]  # an empty file of its own, in the target's directory
    assert path.read_bytes() == b"\x7fELF..." and _strays(tmp_path) == []
    assert fsyncs == ["file", "dir"]


def test_reserve_then_commit(tmp_path: Path, fsyncs: list[str]) -> None:
    target = tmp_path / "x.npz"
    tmp = reserve_temp(target)
    assert tmp.parent == tmp_path and tmp.read_bytes() == b"" and not target.exists()
    with open(tmp, "wb") as f:
        np.savez(f, a=np.arange(3))
    assert commit_temp(tmp, target) == target
    assert not tmp.exists() and np.load(target)["a"].tolist() == [0, 1, 2]
    assert fsyncs == ["file", "dir"]
    assert reserve_temp(target) != reserve_temp(target)  # a fresh name each time


def test_never_writes_through_a_file_planted_at_the_temporary_name(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fileio.secrets, "token_hex", lambda n: "feed")
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / f".a.bin.{os.getpid()}.feed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        atomic_write(tmp_path / "a.bin", lambda f: f.write(b"attack"))
    with pytest.raises(FileExistsError):
        reserve_temp(tmp_path / "a.bin")
    assert victim.read_bytes() == b"keep me" and not (tmp_path / "a.bin").exists()


def test_directories_that_cannot_be_synced_are_tolerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.fsync

    def no_dir_sync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")  # some file systems refuse to fsync a directory
        real(fd)

    monkeypatch.setattr(os, "fsync", no_dir_sync)
    fsync_directory(tmp_path)
    assert atomic_write(tmp_path / "a", lambda f: f.write(b"1")).read_bytes() == b"1"
    fsync_directory(tmp_path / "missing")  # nothing to sync: no error


@pytest.mark.skipif(kernels._compiler() is None, reason="no C compiler on this machine")
def test_kernel_builds_go_through_the_atomic_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   fsyncs: list[str]) -> None:
    monkeypatch.setenv("L2O_CACHE", str(tmp_path))
    built = kernels._build(kernels._compiler(), b"int l2o_probe(void) { return 7; }\n")
    assert built.parent == tmp_path / "kernels" and _strays(built.parent) == []
    assert ctypes.CDLL(str(built)).l2o_probe() == 7
    assert fsyncs == ["file", "dir"]
