"""Tests for optimizees.datafiles: locating, verifying and caching the files the data readers decode."""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest

from optimizees import data, datafiles
from optimizees.datafiles import (DataError, DataSource, Memo, Wanted, cached_arrays, checksum_mismatch, file_hashes,
                                  file_key, locate, resolve_cache_dir, resolve_data_dir)

SOURCE = DataSource("Toy", "toy", "Get toy.bin from https://example.org/toy and put it in DIR/toy/ or DIR.")


# --------------------------------------------------------------------------------------------
# Where


def test_the_argument_wins_then_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2O_DATA", str(tmp_path / "env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(None) == tmp_path / "env" and resolve_data_dir("") == tmp_path / "env"
    monkeypatch.setenv("L2O_DATA", "~/somewhere")
    assert resolve_data_dir(None) == Path.home() / "somewhere"
    monkeypatch.delenv("L2O_DATA")
    with pytest.raises(DataError) as err:
        resolve_data_dir(None, (SOURCE,))
    message = str(err.value)
    assert "--data DIR" in message and "L2O_DATA" in message and "Toy: Get toy.bin from https://example.org/toy" in message
    with pytest.raises(TypeError, match="data_dir"):
        resolve_data_dir(3)  # type: ignore[arg-type]


def test_locate_prefers_the_subfolder_and_the_first_name(tmp_path: Path) -> None:
    for directory in (tmp_path, tmp_path / "toy"):
        directory.mkdir(exist_ok=True)
        (directory / "a.bin").write_bytes(b"a")
        (directory / "b.bin.gz").write_bytes(b"b")
        (directory / "b.bin").write_bytes(b"b")
    found = locate(tmp_path, SOURCE, ["a.bin", Wanted("b.bin[.gz]", ("b.bin.gz", "b.bin"))], what="Toy files")
    assert found == [tmp_path / "toy" / "a.bin", tmp_path / "toy" / "b.bin.gz"]
    (tmp_path / "toy" / "a.bin").unlink()  # the subfolder no longer holds them all: DIR does
    assert locate(tmp_path, SOURCE, ["a.bin", "b.bin"], what="Toy files") == [tmp_path / "a.bin", tmp_path / "b.bin"]


def test_locate_says_what_is_missing_where_and_how_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"a")
    with pytest.raises(DataError) as err:
        locate(tmp_path, SOURCE, ["a.bin", Wanted("b.bin[.gz]", ("b.bin.gz", "b.bin"))], what="Toy files")
    message = str(err.value)
    assert message.startswith("Toy files not found: no directory searched holds all of a.bin, b.bin[.gz].")
    assert f"  {tmp_path / 'toy'} (directory does not exist): missing a.bin, b.bin[.gz]\n" in message
    assert f"  {tmp_path}: missing b.bin[.gz]\n" in message
    assert message.endswith(SOURCE.how_to_get)


# --------------------------------------------------------------------------------------------
# Verify


def test_file_hashes_stream_the_file_in_blocks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blob = np.random.default_rng(0).integers(0, 256, 3 * (1 << 20) + 17, dtype=np.uint8).tobytes()
    path = tmp_path / "big.bin"
    path.write_bytes(blob)
    reads = []
    real_open = open

    class Spy:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def read(self, n=-1):
            reads.append(n)
            return self.f.read(n)

    monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: Spy(real_open(p, mode, *a, **k)))
    sha, md5 = file_hashes(path, "sha256", "md5")
    monkeypatch.undo()
    assert sha == hashlib.sha256(blob).hexdigest() and md5 == hashlib.md5(blob).hexdigest()
    assert set(reads) == {1 << 20} and len(reads) == 5  # 4 blocks and the empty read at the end
    assert file_hashes(path) == (sha,)


def test_checksum_mismatch_names_the_file_the_sums_and_the_way_out(tmp_path: Path) -> None:
    err = checksum_mismatch(tmp_path / "toy.bin", what="Toy toy.bin", expected="abc", found="def",
                            how_to_get=SOURCE.how_to_get)
    assert isinstance(err, DataError) and isinstance(err, ValueError)
    message = str(err)
    assert message.startswith(f"{tmp_path / 'toy.bin'}: sha256 mismatch for Toy toy.bin: expected abc, found def.")
    assert "verify=False" in message and message.endswith(SOURCE.how_to_get)
    assert str(checksum_mismatch(Path("x"), what="X", expected="1", found="2", how_to_get="",
                                 kind="checksum")).startswith("x: checksum mismatch for X")


# --------------------------------------------------------------------------------------------
# Cache


def test_memo_is_a_bounded_lru_keyed_by_file_identity(tmp_path: Path) -> None:
    memo = Memo(maxsize=2)
    memo.put("a", 1)
    memo.put("b", 2)
    assert memo.get("a") == 1  # now the most recent
    memo.put("c", 3)
    assert memo.get("b") is None and memo.get("a") == 1 and memo.get("c") == 3
    memo.clear()
    assert memo.get("a") is None
    path = tmp_path / "f"
    path.write_bytes(b"one")
    key = file_key(path)
    assert key == file_key(tmp_path / "." / "f")  # the resolved path
    path.write_bytes(b"three")
    assert file_key(path) != key  # rewritten: another size (and mtime)


def test_cache_dir_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2O_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(None) == resolve_cache_dir(True) == tmp_path / "env"
    assert resolve_cache_dir(False) is None
    assert resolve_cache_dir(str(tmp_path / "mine")) == tmp_path / "mine"
    with pytest.raises(TypeError, match="cache_dir"):
        datafiles.check_cache_dir(3)


def _valid(arrays) -> bool:
    return arrays["x"].dtype == np.int64 and arrays["x"].ndim == 1


def test_cached_arrays_build_once_and_rebuild_what_is_unusable(tmp_path: Path) -> None:
    file = tmp_path / "cache" / "toy-0123456789abcdef-v1.npz"
    calls = []

    def build():
        calls.append(1)
        return {"x": np.arange(4)}

    first = cached_arrays(file, build, names=("x",), valid=_valid, what="Toy")
    again = cached_arrays(file, build, names=("x",), valid=_valid, what="Toy")
    assert calls == [1] and first["x"].tolist() == again["x"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in file.parent.iterdir()] == [file.name]  # written atomically: no temporary left
    for damage in (b"not a npz file", None):
        if damage is None:
            np.savez(file, x=np.zeros((2, 2)))  # loadable, but not what valid() accepts
        else:
            file.write_bytes(damage)
        assert cached_arrays(file, build, names=("x",), valid=_valid, what="Toy")["x"].tolist() == [0, 1, 2, 3]
    assert calls == [1, 1, 1] and np.load(file)["x"].tolist() == [0, 1, 2, 3]  # rebuilt and rewritten
    assert cached_arrays(file, build, names=("x", "y"), valid=_valid, what="Toy")  # an array missing: rebuilt
    assert len(calls) == 4
    assert cached_arrays(None, build, names=("x",), valid=_valid, what="Toy")["x"].tolist() == [0, 1, 2, 3]
    assert len(calls) == 5  # no file: always built


def test_cache_files_are_synced_before_and_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    cached_arrays(tmp_path / "toy.npz", lambda: {"x": np.arange(2)}, names=("x",), valid=_valid, what="Toy")
    assert synced == [False, True]  # the file's data, then the directory entry


def test_an_unwritable_cache_only_warns(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="could not write the Toy cache"):
        arrays = cached_arrays(blocker / "toy.npz", lambda: {"x": np.arange(2)}, names=("x",), valid=_valid,
                               what="Toy")
    assert arrays["x"].tolist() == [0, 1]


# --------------------------------------------------------------------------------------------
# The MNIST reader's disk cache: published files only, keyed by their sha256


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def _write_split(directory: Path, seed: int) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (3,), dtype=np.uint8),
    }
    out = {}
    for stem, array in files.items():
        (directory / stem).write_bytes(_idx(array))
        out[stem] = directory / stem
    return out


def _publish(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> dict[str, str]:
    """Treat these (fake) files as the published MNIST files."""
    sums = {stem: hashlib.sha256(p.read_bytes()).hexdigest() for stem, p in files.items()}
    for stem, sha in sums.items():
        monkeypatch.setitem(data.MNIST_RAW_SHA256, stem, sha)
    return sums


def test_mnist_disk_cache_hits_by_checksum(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    files = _write_split(tmp_path / "mnist", seed=0)
    data._clear_cache()
    unpublished = data.load_mnist(tmp_path, verify=False, cache_dir=cache)
    assert not cache.exists()  # other files than the published ones are never cached on disk

    sums = _publish(monkeypatch, files)
    data._clear_cache()
    images, labels = data.load_mnist(tmp_path, cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == sorted(f"mnist-{stem}-{sha[:16]}-v1.npz" for stem, sha in sums.items())
    assert np.array_equal(images.numpy(), unpublished[0].numpy())

    data._clear_cache()
    monkeypatch.setattr(data, "_read_idx_bytes", lambda *a, **k: pytest.fail("parsed although cached"))
    hit_images, hit_labels = data.load_mnist(tmp_path, cache_dir=cache)
    assert np.array_equal(hit_images.numpy(), images.numpy()) and np.array_equal(hit_labels.numpy(), labels.numpy())
    monkeypatch.undo()

    # new content under the same names: its own cache entries, never the stale ones
    files = _write_split(tmp_path / "mnist", seed=1)
    os.utime(files["train-images-idx3-ubyte"], ns=(0, 10**9))  # a new identity in-process, even on a coarse clock
    _publish(monkeypatch, files)
    fresh, _ = data.load_mnist(tmp_path, cache_dir=cache)
    assert not np.array_equal(fresh.numpy(), images.numpy())
    assert len(list(cache.iterdir())) == 4
    assert np.array_equal(fresh.numpy(), data.read_idx(files["train-images-idx3-ubyte"]))


def test_mnist_checksum_errors_say_how_to_get_the_files(tmp_path: Path) -> None:
    _write_split(tmp_path, seed=0)
    data._clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match="sha256 mismatch") as err:
            data.load_mnist(tmp_path, cache_dir=False)
    assert "yann.lecun.com" in str(err.value) and "verify=False" in str(err.value)
