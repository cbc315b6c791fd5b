"""Tests for optimizees.data: the IDX reader and the MNIST / Fashion-MNIST loaders."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizees import data
from optimizees.data import (
    FASHION_MNIST_DEBIAN_SHA256,
    FASHION_MNIST_RAW_SHA256,
    FASHION_MNIST_SHA256,
    MNIST_RAW_SHA256,
    MNIST_SHA256,
    DataError,
    load_mnist,
    read_idx,
    resolve_data_dir,
)

# From shared/data/README.md ("Parsed and checked").
MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ALL_STEMS = STEMS["train"] + STEMS["test"]

CODES = {
    np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E
}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode ``array`` as an IDX file."""
    code = CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, payload: bytes, *, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload, mtime=0) if gz else payload)
    return path


def tiny_split(n: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
    return images, labels


def write_fake_layout(
    directory: Path, *, gz: bool = True, splits: tuple[str, ...] = ("train", "test"), n: int = 5
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write tiny, well-formed (but not the real) MNIST-named files into ``directory``."""
    out = {}
    for i, split in enumerate(splits):
        images, labels = tiny_split(n + i, seed=i)
        image_stem, label_stem = STEMS[split]
        suffix = ".gz" if gz else ""
        write(directory / (image_stem + suffix), idx_bytes(images), gz=gz)
        write(directory / (label_stem + suffix), idx_bytes(labels), gz=gz)
        out[split] = (images, labels)
    return out


# ------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize(
    "array",
    [
        np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28),
        np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.uint8),
        np.array([[-128, 127], [0, -1]], dtype=np.int8),
        np.array([-32768, 32767, 258], dtype=np.int16),
        np.array([[-(2**31), 2**31 - 1, 65536]], dtype=np.int32),
        np.array([[1.5, -2.25], [np.inf, 3e38]], dtype=np.float32),
        np.array([1e-300, -0.5, np.pi], dtype=np.float64),
        np.zeros((0, 28, 28), dtype=np.uint8),
    ],
    ids=["u8-3d", "u8-1d", "i8", "i16", "i32", "f32", "f64", "empty"],
)
def test_read_idx_round_trip(tmp_path: Path, array: np.ndarray, gz: bool) -> None:
    path = write(tmp_path / "x.idx", idx_bytes(array), gz=gz)
    got = read_idx(path)
    assert got.dtype == array.dtype and got.dtype.isnative
    assert got.shape == array.shape
    np.testing.assert_array_equal(got, array)
    assert got.flags.writeable


def test_read_idx_detects_gzip_by_magic_not_suffix(tmp_path: Path) -> None:
    array = np.arange(12, dtype=np.int16).reshape(3, 4)
    gz_no_suffix = write(tmp_path / "a-idx2-ubyte", idx_bytes(array), gz=True)
    plain_gz_suffix = write(tmp_path / "b-idx2-ubyte.gz", idx_bytes(array), gz=False)
    np.testing.assert_array_equal(read_idx(gz_no_suffix), array)
    np.testing.assert_array_equal(read_idx(plain_gz_suffix), array)
    np.testing.assert_array_equal(read_idx(str(plain_gz_suffix)), array)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_truncated_payload(tmp_path: Path, gz: bool) -> None:
    payload = idx_bytes(np.ones((3, 28, 28), dtype=np.uint8))[:-10]
    path = write(tmp_path / "short.idx", payload, gz=gz)
    with pytest.raises(DataError, match=r"expected 2352 bytes, found 2342") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_payload_too_long(tmp_path: Path) -> None:
    path = write(tmp_path / "long.idx", idx_bytes(np.ones(4, dtype=np.int32)) + b"\0")
    with pytest.raises(DataError, match=r"longer.*expected 16 bytes, found 17") as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("payload", [b"", b"\0\0\x08", b"\0\0\x08\x03" + b"\0" * 7])
def test_truncated_header(tmp_path: Path, payload: bytes) -> None:
    path = write(tmp_path / "hdr.idx", payload)
    with pytest.raises(DataError, match="truncated IDX header") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_bad_magic(tmp_path: Path) -> None:
    path = write(tmp_path / "magic.idx", b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x07")
    with pytest.raises(DataError, match=r"bad IDX magic.*00 01") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_unknown_dtype(tmp_path: Path) -> None:
    path = write(tmp_path / "dtype.idx", b"\x00\x00\x0a\x01" + struct.pack(">I", 1) + b"\x07")
    with pytest.raises(DataError, match=r"unknown IDX dtype code 0x0A") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def _corrupt_gzips() -> dict[str, bytes]:
    good = gzip.compress(idx_bytes(np.arange(200, dtype=np.uint8)), mtime=0)
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 0xFF
    return {
        "garbage": b"\x1f\x8b" + b"not a deflate stream at all",
        "truncated": good[: len(good) // 2],
        "bad-crc": bytes(bad_crc),
        "trailing-garbage": good + b"junk",
    }


@pytest.mark.parametrize("name", list(_corrupt_gzips()))
def test_corrupt_gzip(tmp_path: Path, name: str) -> None:
    path = write(tmp_path / f"{name}.gz", _corrupt_gzips()[name])
    with pytest.raises(DataError, match="corrupt gzip stream") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "nope.idx")


# ------------------------------------------------------------------------------------------
# read_idx never raises anything but DataError on bad input (hypothesis)

_VALID = idx_bytes(np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5))
_VALID_GZ = gzip.compress(_VALID, mtime=0)


def _read_or_data_error(path: Path, payload: bytes) -> np.ndarray | None:
    path.write_bytes(payload)
    try:
        return read_idx(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return None


_FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # no .hypothesis/ example database in the checkout
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@_FUZZ
@given(payload=st.binary(max_size=64) | st.binary(max_size=24).map(lambda b: b"\0\0" + b))
def test_fuzz_random_bytes(tmp_path: Path, payload: bytes) -> None:
    _read_or_data_error(tmp_path / "fuzz.bin", payload)
    _read_or_data_error(tmp_path / "fuzz.bin", b"\x1f\x8b" + payload)


@_FUZZ
@given(gz=st.booleans(), cut=st.integers(min_value=0))
def test_fuzz_truncations(tmp_path: Path, gz: bool, cut: int) -> None:
    source = _VALID_GZ if gz else _VALID
    cut = cut % (len(source) + 1)
    result = _read_or_data_error(tmp_path / "trunc.bin", source[:cut])
    if cut == len(source):
        assert result is not None and result.shape == (3, 4, 5)
    else:
        assert result is None  # every proper prefix of a valid file is rejected


@_FUZZ
@given(gz=st.booleans(), data=st.data())
def test_fuzz_byte_flips(tmp_path: Path, gz: bool, data: st.DataObject) -> None:
    source = bytearray(_VALID_GZ if gz else _VALID)
    positions = data.draw(st.lists(st.integers(0, len(source) - 1), min_size=1, max_size=4))
    for pos in positions:
        source[pos] = data.draw(st.integers(0, 255))
    _read_or_data_error(tmp_path / "flip.bin", bytes(source))


# ------------------------------------------------------------------------------------------
# resolve_data_dir


def test_resolve_data_dir_argument_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2O_DATA", str(tmp_path / "from-env"))
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert resolve_data_dir(str(tmp_path / "arg")) == tmp_path / "arg"


def test_resolve_data_dir_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("L2O_DATA", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path


@pytest.mark.parametrize("env", [None, ""])
def test_resolve_data_dir_unset(monkeypatch: pytest.MonkeyPatch, env: str | None) -> None:
    if env is None:
        monkeypatch.delenv("L2O_DATA", raising=False)
    else:
        monkeypatch.setenv("L2O_DATA", env)
    with pytest.raises(DataError) as info:
        resolve_data_dir(None)
    message = str(info.value)
    needles = ("--data DIR", "L2O_DATA", "yann.lecun.com", "apt-get install dataset-fashion-mnist")
    for needle in needles:
        assert needle in message


def test_load_mnist_uses_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = write_fake_layout(tmp_path / "mnist")
    monkeypatch.setenv("L2O_DATA", str(tmp_path))
    images, labels = load_mnist(split="test", verify=False)
    np.testing.assert_array_equal(images.numpy(), expected["test"][0])
    np.testing.assert_array_equal(labels.numpy(), expected["test"][1])


# ------------------------------------------------------------------------------------------
# load_mnist on fake layouts


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
@pytest.mark.parametrize("sub", ["mnist", ""], ids=["DIR-mnist", "DIR"])
def test_load_fake_layout(tmp_path: Path, gz: bool, sub: str) -> None:
    expected = write_fake_layout(tmp_path / sub if sub else tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist(tmp_path, split=split, verify=False)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(expected[split][1]), 28, 28)
        np.testing.assert_array_equal(images.numpy(), expected[split][0])
        np.testing.assert_array_equal(labels.numpy(), expected[split][1])


def test_fashion_layout_and_subdir_first(tmp_path: Path) -> None:
    direct = write_fake_layout(tmp_path, splits=("train",), n=3)
    sub = write_fake_layout(tmp_path / "fashion-mnist", splits=("train",), n=7)
    images, _ = load_mnist(tmp_path, dataset="fashion-mnist", verify=False)
    np.testing.assert_array_equal(images.numpy(), sub["train"][0])
    images, _ = load_mnist(tmp_path, dataset="mnist", verify=False)  # no DIR/mnist: DIR
    np.testing.assert_array_equal(images.numpy(), direct["train"][0])


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_checksum_mismatch_names_file(tmp_path: Path, gz: bool) -> None:
    write_fake_layout(tmp_path / "mnist", gz=gz)
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        load_mnist(tmp_path, split="train", verify=True)
    message = str(info.value)
    name = "train-images-idx3-ubyte" + (".gz" if gz else "")
    path = tmp_path / "mnist" / name
    assert str(path) in message
    found = hashlib.sha256(path.read_bytes()).hexdigest()
    assert found in message
    if gz:
        assert MNIST_SHA256[name] in message
    assert MNIST_RAW_SHA256["train-images-idx3-ubyte"] in message


def test_fashion_checksum_mismatch_lists_all_accepted(tmp_path: Path) -> None:
    write_fake_layout(tmp_path, splits=("test",))
    with pytest.raises(DataError, match="Fashion-MNIST") as info:
        load_mnist(tmp_path, split="test", dataset="fashion-mnist")
    message = str(info.value)
    name = "t10k-images-idx3-ubyte.gz"
    assert str(tmp_path / name) in message
    assert FASHION_MNIST_SHA256[name] in message and FASHION_MNIST_DEBIAN_SHA256[name] in message


def test_missing_files_message(tmp_path: Path) -> None:
    # Only the train labels exist, in DIR/mnist; the test split is wholly missing.
    write(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", idx_bytes(tiny_split()[1]), gz=True)
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, split="train")
    message = str(info.value)
    assert "train-images-idx3-ubyte" in message
    assert f"{tmp_path / 'mnist'}: missing train-images-idx3-ubyte[.gz]\n" in message
    both = "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz]"
    assert f"{tmp_path}: missing {both}" in message
    assert "yann.lecun.com" in message and "DIR/mnist" in message

    with pytest.raises(DataError) as info:
        load_mnist(tmp_path / "nowhere", split="test", dataset="fashion-mnist")
    message = str(info.value)
    for stem in STEMS["test"]:
        assert stem in message
    assert f"{tmp_path / 'nowhere' / 'fashion-mnist'} (directory does not exist)" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "/usr/share/datasets/fashion-mnist" in message


def _write_split(directory: Path, images: np.ndarray, labels: np.ndarray) -> None:
    write(directory / "train-images-idx3-ubyte", idx_bytes(images))
    write(directory / "train-labels-idx1-ubyte", idx_bytes(labels))


@pytest.mark.parametrize(
    ("images", "labels", "pattern", "culprit"),
    [
        (np.zeros((4, 28, 28), np.uint8), np.zeros(3, np.uint8), "4 images but .* 3 labels",
         "images"),
        (np.zeros((2, 28, 28), np.uint8), np.array([1, 10], np.uint8), r"0\.\.9, found 10 at index 1",
         "labels"),
        (np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.uint8), r"\(N, 28, 28\)", "images"),
        (np.zeros((2, 28, 28), np.float32), np.zeros(2, np.uint8), "uint8 images", "images"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int32), "uint8 labels", "labels"),
        (np.zeros((2, 28, 28), np.uint8), np.zeros((2, 1), np.uint8), "uint8 labels", "labels"),
    ],
    ids=["count", "label-range", "image-size", "image-dtype", "label-dtype", "label-ndim"],
)
def test_inconsistent_files(
    tmp_path: Path, images: np.ndarray, labels: np.ndarray, pattern: str, culprit: str
) -> None:
    _write_split(tmp_path, images, labels)
    with pytest.raises(DataError, match=pattern) as info:
        load_mnist(tmp_path, verify=False)
    assert f"{culprit}-idx" in str(info.value)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path, split="validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dataset"):
        load_mnist(tmp_path, dataset="cifar10")  # type: ignore[arg-type]


def test_cache_returns_independent_tensors_and_sees_changes(tmp_path: Path) -> None:
    images0, labels0 = tiny_split(4, seed=1)
    _write_split(tmp_path, images0, labels0)
    images, labels = load_mnist(tmp_path, verify=False)
    images.fill_(0)
    labels.fill_(0)
    again, labels_again = load_mnist(tmp_path, verify=False)
    np.testing.assert_array_equal(again.numpy(), images0)  # the cache was not mutated
    np.testing.assert_array_equal(labels_again.numpy(), labels0)

    images1, labels1 = tiny_split(6, seed=2)
    _write_split(tmp_path, images1, labels1)
    stat = (tmp_path / "train-images-idx3-ubyte").stat()
    os.utime(tmp_path / "train-images-idx3-ubyte", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    fresh, _ = load_mnist(tmp_path, verify=False)
    np.testing.assert_array_equal(fresh.numpy(), images1)


def test_cached_unverified_load_is_verified_on_request(tmp_path: Path) -> None:
    write_fake_layout(tmp_path, splits=("train",))
    load_mnist(tmp_path, verify=False)
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_mnist(tmp_path, verify=True)


def test_cache_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_layout(tmp_path, splits=("train",))
    data._clear_cache()
    load_mnist(tmp_path, verify=False)
    calls = []
    real = data._read_idx_bytes
    monkeypatch.setattr(data, "_read_idx_bytes", lambda *a, **k: calls.append(a) or real(*a, **k))
    load_mnist(tmp_path, verify=False)
    assert calls == []


# ------------------------------------------------------------------------------------------
# The real files in shared/data


def _readme_sha256_table(readme: str, *, mnist: bool) -> dict[str, str]:
    if mnist:
        rows = re.findall(r"^\| `mnist/([\w.-]+)` \|.*\| `([0-9a-f]{64})` \|$", readme, re.M)
    else:
        pattern = r"^\| ([\w-]+\.gz) \| [\d,]+ \| `[0-9a-f]{32}` \| `([0-9a-f]{64})` \|$"
        rows = re.findall(pattern, readme, re.M)
    return dict(rows)


def test_checksum_constants_match_readme(shared_data_dir: Path) -> None:
    readme = (shared_data_dir / "README.md").read_text(encoding="utf-8")
    assert _readme_sha256_table(readme, mnist=True) == dict(MNIST_SHA256)
    assert _readme_sha256_table(readme, mnist=False) == dict(FASHION_MNIST_DEBIAN_SHA256)
    lines = (shared_data_dir / "SHA256SUMS").read_text().splitlines()
    sums = {
        name.removeprefix("mnist/"): sha
        for sha, name in (line.split() for line in lines)
        if name.startswith("mnist/")
    }
    assert sums == dict(MNIST_SHA256)
    # The README's label counts are the ones this file checks against.
    counts = re.findall(r"counts \[([\d,\s]+)\]", readme)
    assert [[int(c) for c in group.split(",")] for group in counts] == [
        MNIST_TRAIN_LABEL_COUNTS,
        MNIST_TEST_LABEL_COUNTS,
    ]
    # Every table has the same four names.
    for table in (MNIST_SHA256, FASHION_MNIST_SHA256, FASHION_MNIST_DEBIAN_SHA256):
        assert sorted(table) == sorted(stem + ".gz" for stem in ALL_STEMS)
    for table in (MNIST_RAW_SHA256, FASHION_MNIST_RAW_SHA256):
        assert sorted(table) == sorted(ALL_STEMS)


def test_mnist_raw_checksums_match_shared_files(shared_data_dir: Path) -> None:
    for stem in ALL_STEMS:
        raw = gzip.decompress((shared_data_dir / "mnist" / f"{stem}.gz").read_bytes())
        assert hashlib.sha256(raw).hexdigest() == MNIST_RAW_SHA256[stem], stem


@pytest.mark.parametrize(
    ("split", "n", "counts"),
    [("train", 60000, MNIST_TRAIN_LABEL_COUNTS), ("test", 10000, MNIST_TEST_LABEL_COUNTS)],
)
def test_load_real_mnist(shared_data_dir: Path, split: str, n: int, counts: list[int]) -> None:
    images, labels = load_mnist(shared_data_dir, split=split, verify=True)  # type: ignore[arg-type]
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == counts
    assert int(images.min()) == 0 and int(images.max()) == 255
    again, _ = load_mnist(shared_data_dir / "mnist", split=split, verify=True)  # files in DIR
    assert torch.equal(again, images)


def test_real_mnist_uncompressed_and_recompressed_verify(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    for stem in STEMS["test"]:
        raw = gzip.decompress((shared_data_dir / "mnist" / f"{stem}.gz").read_bytes())
        write(tmp_path / "plain" / stem, raw)
        # A mirror that re-compressed the same data: new .gz bytes, same content.
        (tmp_path / "regz" / f"{stem}.gz").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "regz" / f"{stem}.gz").write_bytes(gzip.compress(raw, compresslevel=1, mtime=0))
    reference, ref_labels = load_mnist(shared_data_dir, split="test")
    for sub in ("plain", "regz"):
        images, labels = load_mnist(tmp_path / sub, split="test", verify=True)
        assert torch.equal(images, reference) and torch.equal(labels, ref_labels)
    # One flipped pixel in the uncompressed file fails verification and names the file.
    path = tmp_path / "plain" / "t10k-images-idx3-ubyte"
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="sha256 mismatch") as info:
        load_mnist(tmp_path / "plain", split="test", verify=True)
    assert str(path) in str(info.value)
    assert MNIST_RAW_SHA256["t10k-images-idx3-ubyte"] in str(info.value)


# ------------------------------------------------------------------------------------------
# Fashion-MNIST, only where it is installed (never required)

_FASHION_DIRS = [
    Path(p)
    for p in (os.environ.get("L2O_TEST_FASHION_MNIST", ""), "/usr/share/datasets/fashion-mnist")
    if p
]
# md5s published by zalandoresearch/fashion-mnist for its .gz files.
_ZALANDO_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}


@pytest.fixture(scope="module")
def fashion_dir() -> Path:
    for directory in _FASHION_DIRS:
        if all((directory / name).is_file() for name in _ZALANDO_MD5):
            return directory
    pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


@pytest.mark.parametrize("split", ["train", "test"])
def test_load_real_fashion_mnist(fashion_dir: Path, split: str) -> None:
    images, labels = load_mnist(
        fashion_dir, split=split, dataset="fashion-mnist"  # type: ignore[arg-type]
    )
    n = 60000 if split == "train" else 10000
    assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels, minlength=10).tolist() == [n // 10] * 10


def test_fashion_upstream_checksums_follow_from_debian_files(fashion_dir: Path) -> None:
    """Restoring the gzip FNAME and MTIME of Debian's files gives zalando's published files."""
    for name, md5 in _ZALANDO_MD5.items():
        blob = (fashion_dir / name).read_bytes()
        if hashlib.sha256(blob).hexdigest() == FASHION_MNIST_SHA256[name]:
            upstream = blob  # already the upstream file
        else:
            assert hashlib.sha256(blob).hexdigest() == FASHION_MNIST_DEBIAN_SHA256[name]
            mtime = 1504176606 if name.startswith("train") else 1504176627
            header = b"\x1f\x8b\x08\x08" + struct.pack("<I", mtime) + b"\x00\x03"
            upstream = header + name.removesuffix(".gz").encode() + b"\0" + blob[10:]
        assert hashlib.md5(upstream).hexdigest() == md5
        assert hashlib.sha256(upstream).hexdigest() == FASHION_MNIST_SHA256[name]
        raw = gzip.decompress(upstream)
        assert hashlib.sha256(raw).hexdigest() == FASHION_MNIST_RAW_SHA256[name.removesuffix(".gz")]
