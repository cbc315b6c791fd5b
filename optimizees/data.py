"""Readers for the real data sets the optimizees train on: MNIST and Fashion-MNIST.

Nothing here touches the network. The files must already be on disk; the error messages say
where to get them. Files are located from an explicit directory, else the ``L2O_DATA``
environment variable (see :func:`resolve_data_dir`).

Both data sets use the IDX format (see :func:`read_idx`), as four files per data set::

    train-images-idx3-ubyte[.gz]  train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]   t10k-labels-idx1-ubyte[.gz]

With ``verify=True`` every file is checked against a published sha256. A ``.gz`` file passes
when its own sha256 is one of the known ``.gz`` sums (MNIST: the yann.lecun.com files;
Fashion-MNIST: the zalandoresearch files or Debian's ``dataset-fashion-mnist`` files, which
differ only in the gzip header), or when its decompressed content has the known sha256 (so a
mirror that re-compressed the same data is accepted). An uncompressed file passes when its
content has the known sha256.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

__all__ = [
    "DataError",
    "read_idx",
    "resolve_data_dir",
    "load_mnist",
    "DATA_ENV_VAR",
    "IDX_DTYPES",
    "MNIST_SHA256",
    "MNIST_RAW_SHA256",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_DEBIAN_SHA256",
    "FASHION_MNIST_RAW_SHA256",
]

DATA_ENV_VAR = "L2O_DATA"
"""Environment variable naming the data directory when none is passed."""

IDX_DTYPES: Mapping[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
"""IDX type codes (third header byte) and the big-endian dtypes they denote."""

# sha256 of the four .gz files published at yann.lecun.com/exdb/mnist (also in TFDS and
# shared/data/README.md; md5s match the widely published ones).
MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

# sha256 of the decompressed MNIST IDX files (computed from the .gz files above).
MNIST_RAW_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# sha256 of the upstream zalandoresearch/fashion-mnist .gz files (data/fashion/). Derived from
# the Debian files by restoring the gzip FNAME and MTIME fields; the result has exactly the
# md5s zalandoresearch publishes (8d4fb7e6..., 25c81989..., bef4ecab..., bb300cfd...).
FASHION_MNIST_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
    "train-labels-idx1-ubyte.gz": "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
    "t10k-images-idx3-ubyte.gz": "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
    "t10k-labels-idx1-ubyte.gz": "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
}

# sha256 of the .gz files in Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
# (/usr/share/datasets/fashion-mnist/); same deflate streams as upstream, new gzip header.
FASHION_MNIST_DEBIAN_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
}

# sha256 of the decompressed Fashion-MNIST IDX files (identical for upstream and Debian).
FASHION_MNIST_RAW_SHA256: Mapping[str, str] = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}

_GZIP_MAGIC = b"\x1f\x8b"
_IMAGE_SIZE = (28, 28)
_NUM_CLASSES = 10
_CACHE_SIZE = 8

Split = Literal["train", "test"]
Dataset = Literal["mnist", "fashion-mnist"]


class DataError(ValueError):
    """A data file is missing, malformed, or does not match its published checksum."""


class _DatasetInfo(NamedTuple):
    title: str
    subdir: str
    gz_sha256: Mapping[str, frozenset[str]]
    raw_sha256: Mapping[str, str]
    how_to_get: str


def _merge(*tables: Mapping[str, str]) -> dict[str, frozenset[str]]:
    return {name: frozenset(t[name] for t in tables) for name in tables[0]}


_DATASETS: Mapping[str, _DatasetInfo] = {
    "mnist": _DatasetInfo(
        title="MNIST",
        subdir="mnist",
        gz_sha256=_merge(MNIST_SHA256),
        raw_sha256=MNIST_RAW_SHA256,
        how_to_get=(
            "Get the four MNIST files published at http://yann.lecun.com/exdb/mnist/ "
            "(or from any mirror whose files have the sha256s in optimizees.data.MNIST_SHA256) "
            "and put them, gzipped or not, in DIR or DIR/mnist/."
        ),
    ),
    "fashion-mnist": _DatasetInfo(
        title="Fashion-MNIST",
        subdir="fashion-mnist",
        gz_sha256=_merge(FASHION_MNIST_SHA256, FASHION_MNIST_DEBIAN_SHA256),
        raw_sha256=FASHION_MNIST_RAW_SHA256,
        how_to_get=(
            "On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs them to "
            "/usr/share/datasets/fashion-mnist (pass that directory); or get the four files "
            "from https://github.com/zalandoresearch/fashion-mnist (data/fashion/) and put "
            "them, gzipped or not, in DIR or DIR/fashion-mnist/."
        ),
    ),
}

_SPLIT_PREFIX: Mapping[str, str] = {"train": "train", "test": "t10k"}


# --------------------------------------------------------------------------------------------
# IDX parsing


def _decompress(path: Path, data: bytes) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"{path}: corrupt gzip stream ({exc})") from exc


def _parse_idx(path: Path, data: bytes) -> np.ndarray:
    if len(data) < 4:
        raise DataError(
            f"{path}: truncated IDX header: expected at least 4 bytes, found {len(data)}"
        )
    if data[0] != 0 or data[1] != 0:
        raise DataError(
            f"{path}: bad IDX magic: the first two bytes must be 00 00, found "
            f"{data[0]:02x} {data[1]:02x} (not an IDX file?)"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} header bytes, "
            f"found {len(data)}"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    count = 1
    for dim in shape:
        count *= dim
    expected = count * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        kind = "shorter" if found < expected else "longer"
        raise DataError(
            f"{path}: IDX payload is {kind} than its dimensions {shape} of {dtype.name} imply: "
            f"expected {expected} bytes, found {found}"
        )
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header_len)
    # A native-byte-order, writable copy that does not pin the whole file buffer.
    try:
        return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)
    except ValueError as exc:  # e.g. (0, 2**32 - 1, 2**32 - 1): no data, but a shape numpy cannot hold
        raise DataError(f"{path}: IDX dimensions {shape} are not a valid array shape ({exc})") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzipped or not) into a numpy array.

    The IDX header is two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16,
    0x0C int32, 0x0D float32, 0x0E float64; all big-endian), the number of dimensions, then
    that many big-endian uint32 sizes; the payload follows in row-major order. Gzip is
    recognised by its magic bytes (1f 8b), not by the file name.

    Args:
        path: the file to read.

    Returns:
        A writable array in native byte order with the dtype and shape the header gives.

    Raises:
        DataError: the file is not a well-formed IDX file (bad magic, unknown dtype code,
            truncated header, payload length not matching the dimensions, corrupt gzip).
            The message names the file.
        OSError: the file cannot be opened or read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__} ({path!r})")
    return _read_idx_bytes(Path(path))[0]


def _read_idx_bytes(
    path: Path, *, hashes: bool = False
) -> tuple[np.ndarray, str | None, str | None]:
    """Parse ``path``; optionally also return sha256 of the file and of its decompressed content."""
    raw = path.read_bytes()
    is_gzip = raw[:2] == _GZIP_MAGIC
    data = _decompress(path, raw) if is_gzip else raw
    file_sha = hashlib.sha256(raw).hexdigest() if hashes else None
    content_sha = (hashlib.sha256(data).hexdigest() if is_gzip else file_sha) if hashes else None
    return _parse_idx(path, data), file_sha, content_sha


# --------------------------------------------------------------------------------------------
# Locating files


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    """Return the data directory: ``data_dir`` if given, else ``$L2O_DATA``.

    Args:
        data_dir: an explicit directory, or None to use the ``L2O_DATA`` environment variable.

    Returns:
        The directory as a ``Path`` (``~`` expanded). Its existence is not checked here; the
        loaders report missing files with every directory they searched.

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
        f"{DATA_ENV_VAR} environment variable to a directory holding the data sets. "
        "MNIST: the four files from http://yann.lecun.com/exdb/mnist/ (or any mirror with the "
        "sha256s in optimizees.data.MNIST_SHA256), in DIR or DIR/mnist/. Fashion-MNIST: "
        "`apt-get install dataset-fashion-mnist` installs it to /usr/share/datasets/fashion-mnist, "
        "or get it from https://github.com/zalandoresearch/fashion-mnist, in DIR or "
        "DIR/fashion-mnist/. The repository's developers find MNIST in shared/data/."
    )


def _find(directory: Path, stem: str) -> Path | None:
    """The ``.gz`` or uncompressed file named ``stem`` in ``directory`` (``.gz`` first)."""
    for name in (stem + ".gz", stem):
        candidate = directory / name
        if candidate.is_file():
            return candidate
    return None


def _locate(root: Path, info: _DatasetInfo, stems: tuple[str, ...], split: str) -> list[Path]:
    """Find all ``stems`` in one directory: ``root/<subdir>`` first, then ``root``."""
    searched: list[str] = []
    for directory in (root / info.subdir, root):
        found = [_find(directory, stem) for stem in stems]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
        missing = ", ".join(f"{s}[.gz]" for s, p in zip(stems, found) if p is None)
        state = "" if directory.is_dir() else " (directory does not exist)"
        searched.append(f"  {directory}{state}: missing {missing}")
    raise DataError(
        f"{info.title} {split} files not found: no directory searched holds all of "
        + ", ".join(f"{s}[.gz]" for s in stems)
        + ".\nSearched:\n"
        + "\n".join(searched)
        + f"\n{info.how_to_get}"
    )


# --------------------------------------------------------------------------------------------
# Verification, validation and the cache


def _verify(path: Path, info: _DatasetInfo, stem: str, file_sha: str, content_sha: str) -> None:
    raw_expected = info.raw_sha256[stem]
    gz_expected = info.gz_sha256[stem + ".gz"]
    if file_sha in gz_expected or content_sha == raw_expected:
        return
    if file_sha != content_sha:  # gzipped
        expected = (
            f"one of {', '.join(sorted(gz_expected))} for the .gz file "
            f"(or {raw_expected} for its decompressed content)"
        )
        found = f"{file_sha} (decompressed content: {content_sha})"
    else:
        expected, found = raw_expected, content_sha
    raise DataError(
        f"{path}: sha256 mismatch for {info.title} {stem}: expected {expected}, found {found}. "
        "The file is damaged or is not the published data; remove it and get it again "
        "(or pass verify=False to skip this check)."
    )


def _check_pair(images: np.ndarray, labels: np.ndarray, image_path: Path, label_path: Path) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != _IMAGE_SIZE:
        raise DataError(
            f"{image_path}: expected uint8 images of shape (N, 28, 28), found "
            f"{images.dtype.name} of shape {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(
            f"{label_path}: expected uint8 labels of shape (N,), found "
            f"{labels.dtype.name} of shape {labels.shape}"
        )
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{image_path} has {images.shape[0]} images but {label_path} has "
            f"{labels.shape[0]} labels"
        )
    if labels.size and int(labels.max()) >= _NUM_CLASSES:
        bad = int(np.flatnonzero(labels >= _NUM_CLASSES)[0])
        raise DataError(
            f"{label_path}: labels must be in 0..{_NUM_CLASSES - 1}, found {int(labels[bad])} "
            f"at index {bad}"
        )


class _Entry(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor
    verified: bool


_CacheKey = tuple[str, str, tuple[tuple[str, int, int], ...]]
_cache: OrderedDict[_CacheKey, _Entry] = OrderedDict()
_cache_lock = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int]:
    resolved = path.resolve()
    stat = resolved.stat()
    return (str(resolved), stat.st_mtime_ns, stat.st_size)


def _clear_cache() -> None:
    """Forget every decoded array (for tests and long-lived processes)."""
    with _cache_lock:
        _cache.clear()


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: Split = "train",
    dataset: Dataset = "mnist",
    verify: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST images and labels from local IDX files.

    The files (``train-*`` for ``split="train"``, ``t10k-*`` for ``split="test"``, each
    gzipped or not) are looked for in ``DIR/mnist/`` (``DIR/fashion-mnist/``) and then
    ``DIR``; both files of a split must sit in the same directory. Decoded arrays are cached
    in-process per (resolved path, mtime, size), so loading the same files again is cheap;
    each call returns fresh tensors that the caller may modify.

    Args:
        data_dir: the data directory; None means ``$L2O_DATA`` (see :func:`resolve_data_dir`).
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        verify: check each file's sha256 against the published values (see the module doc).

    Returns:
        ``(images, labels)``: uint8 images of shape (N, 28, 28) and int64 labels of shape (N,).

    Raises:
        DataError: no data directory, missing files (all listed, with the directories searched
            and how to get them), a checksum mismatch, a malformed file, or images and labels
            that disagree (counts, image size, labels outside 0..9).
        ValueError: an unknown ``split`` or ``dataset``.
    """
    if not isinstance(dataset, str) or dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {sorted(_DATASETS)}, got {dataset!r}")
    if not isinstance(split, str) or split not in _SPLIT_PREFIX:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIX)}, got {split!r}")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__} ({verify!r})")
    info = _DATASETS[dataset]
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    root = resolve_data_dir(data_dir)
    image_path, label_path = _locate(root, info, stems, split)

    key: _CacheKey = (dataset, split, (_file_key(image_path), _file_key(label_path)))
    with _cache_lock:
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
    if entry is None or (verify and not entry.verified):
        arrays = []
        for path, stem in ((image_path, stems[0]), (label_path, stems[1])):
            array, file_sha, content_sha = _read_idx_bytes(path, hashes=verify)
            if file_sha is not None and content_sha is not None:
                _verify(path, info, stem, file_sha, content_sha)
            arrays.append(array)
        images, labels = arrays
        _check_pair(images, labels, image_path, label_path)
        entry = _Entry(
            images=torch.from_numpy(images),
            labels=torch.from_numpy(labels.astype(np.int64)),
            verified=verify,
        )
        with _cache_lock:
            _cache[key] = entry
            _cache.move_to_end(key)
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    return entry.images.clone(), entry.labels.clone()
