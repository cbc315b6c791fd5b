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

Locating, hashing and caching are :mod:`optimizees.datafiles`'s: decoded splits are kept
in-process, and the published files' arrays on disk under :func:`l2o.cache.default_cache_dir`
(an ``.npz`` per file, named after its sha256), so a later process reads them without
decompressing (the verified training split: about 0.2 s instead of 0.7 s).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from l2o.validation import check_bool, check_path

from .datafiles import (DATA_ENV_VAR, DataError, DataSource, Memo, Wanted, cached_arrays, check_cache_dir,
                        checksum_mismatch, file_hashes, file_key, locate, resolve_cache_dir)
from .datafiles import resolve_data_dir as _resolve_data_dir

__all__ = [
    "DataError",
    "read_idx",
    "resolve_data_dir",
    "load_mnist",
    "DATA_ENV_VAR",
    "MNIST_SOURCE",
    "FASHION_MNIST_SOURCE",
    "IDX_DTYPES",
    "MNIST_SHA256",
    "MNIST_RAW_SHA256",
    "FASHION_MNIST_SHA256",
    "FASHION_MNIST_DEBIAN_SHA256",
    "FASHION_MNIST_RAW_SHA256",
]

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
_CACHE_FORMAT = 1

Split = Literal["train", "test"]
Dataset = Literal["mnist", "fashion-mnist"]


class _DatasetInfo(NamedTuple):
    source: DataSource
    gz_sha256: Mapping[str, frozenset[str]]
    raw_sha256: Mapping[str, str]

    @property
    def title(self) -> str:
        return self.source.title


def _merge(*tables: Mapping[str, str]) -> dict[str, frozenset[str]]:
    return {name: frozenset(t[name] for t in tables) for name in tables[0]}


#: Where users get MNIST and where to put it.
MNIST_SOURCE = DataSource(
    title="MNIST",
    subdir="mnist",
    how_to_get=(
        "Get the four MNIST files published at http://yann.lecun.com/exdb/mnist/ "
        "(or from any mirror whose files have the sha256s in optimizees.data.MNIST_SHA256; "
        "torchvision.datasets.MNIST(ROOT, download=True) leaves them in ROOT/MNIST/raw/) "
        "and put them, gzipped or not, in DIR or DIR/mnist/."
    ),
)

#: Where users get Fashion-MNIST and where to put it.
FASHION_MNIST_SOURCE = DataSource(
    title="Fashion-MNIST",
    subdir="fashion-mnist",
    how_to_get=(
        "On Debian/Ubuntu, `apt-get install dataset-fashion-mnist` installs the four files to "
        "/usr/share/datasets/fashion-mnist (pass that directory); or get them from "
        "https://github.com/zalandoresearch/fashion-mnist (data/fashion/; "
        "torchvision.datasets.FashionMNIST(ROOT, download=True) leaves them in ROOT/FashionMNIST/raw/) "
        "and put them, gzipped or not, in DIR or DIR/fashion-mnist/."
    ),
)

_DATASETS: Mapping[str, _DatasetInfo] = {
    "mnist": _DatasetInfo(MNIST_SOURCE, gz_sha256=_merge(MNIST_SHA256), raw_sha256=MNIST_RAW_SHA256),
    "fashion-mnist": _DatasetInfo(FASHION_MNIST_SOURCE, gz_sha256=_merge(FASHION_MNIST_SHA256, FASHION_MNIST_DEBIAN_SHA256),
                                  raw_sha256=FASHION_MNIST_RAW_SHA256),
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
    return _read_idx_bytes(Path(check_path("path", path)))[0]


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
# Locating and verifying files


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
    return _resolve_data_dir(data_dir, (MNIST_SOURCE, FASHION_MNIST_SOURCE))


def _wanted(stem: str) -> Wanted:
    """The ``.gz`` or uncompressed file named ``stem`` (``.gz`` first)."""
    return Wanted(f"{stem}[.gz]", (stem + ".gz", stem))


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
    raise checksum_mismatch(path, what=f"{info.title} {stem}", expected=expected, found=found,
                            how_to_get=info.source.how_to_get)


def _published(info: _DatasetInfo, stem: str, file_sha: str) -> bool:
    """Whether a file with sha256 ``file_sha`` is one of the published ``stem`` files (gzipped or not)."""
    return file_sha in info.gz_sha256[stem + ".gz"] or file_sha == info.raw_sha256[stem]


def _read_file(path: Path, info: _DatasetInfo, stem: str, *, verify: bool, cache: Path | None) -> np.ndarray:
    """The array in ``path``, verified if asked. Published files are decoded once into the disk
    cache (keyed by their sha256); others (a re-compressed mirror, test data) are parsed each time."""
    (file_sha,) = file_hashes(path)
    if _published(info, stem, file_sha):
        file = None if cache is None else cache / f"{info.source.subdir}-{stem}-{file_sha[:16]}-v{_CACHE_FORMAT}.npz"
        ndim = 3 if "-images-" in stem else 1
        arrays = cached_arrays(file, lambda: {"array": _read_idx_bytes(path)[0]}, names=("array",),
                               valid=lambda a: a["array"].dtype == np.uint8 and a["array"].ndim == ndim,
                               what=info.title)
        return arrays["array"]
    array, _, content_sha = _read_idx_bytes(path, hashes=verify)
    if verify and content_sha is not None:
        _verify(path, info, stem, file_sha, content_sha)
    return array


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


# Decoded splits, keyed by (dataset, split, identity of both files): loading unchanged files again
# neither hashes nor parses them.
_memory = Memo()


def _clear_cache() -> None:
    """Forget every decoded array kept in-process (for tests and long-lived processes); disk caches stay."""
    _memory.clear()


def load_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: Split = "train",
    dataset: Dataset = "mnist",
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None | bool = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load MNIST or Fashion-MNIST images and labels from local IDX files.

    The files (``train-*`` for ``split="train"``, ``t10k-*`` for ``split="test"``, each
    gzipped or not) are looked for in ``DIR/mnist/`` (``DIR/fashion-mnist/``) and then
    ``DIR``; both files of a split must sit in the same directory. Decoded arrays are cached
    in-process per (resolved path, mtime, size), so loading the same files again is cheap;
    each call returns fresh tensors that the caller may modify. The published files are also
    decoded once into a disk cache named after their sha256 (see :mod:`optimizees.datafiles`).

    Args:
        data_dir: the data directory; None means ``$L2O_DATA`` (see :func:`resolve_data_dir`).
        split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
        dataset: ``"mnist"`` or ``"fashion-mnist"``.
        verify: check each file's sha256 against the published values (see the module doc).
        cache_dir: the disk cache directory; None means :func:`l2o.cache.default_cache_dir`,
            False disables it. An unwritable cache only warns.

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
    check_bool("verify", verify)
    check_cache_dir(cache_dir)
    info = _DATASETS[dataset]
    prefix = _SPLIT_PREFIX[split]
    stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
    root = resolve_data_dir(data_dir)
    image_path, label_path = locate(root, info.source, [_wanted(s) for s in stems], what=f"{info.title} {split} files")

    key = (dataset, split, file_key(image_path), file_key(label_path))
    entry = _memory.get(key)
    if entry is None or (verify and not entry.verified):
        cache = resolve_cache_dir(cache_dir)
        images, labels = [_read_file(path, info, stem, verify=verify, cache=cache)
                          for path, stem in ((image_path, stems[0]), (label_path, stems[1]))]
        _check_pair(images, labels, image_path, label_path)
        entry = _Entry(
            images=torch.from_numpy(images),
            labels=torch.from_numpy(labels.astype(np.int64)),
            verified=verify,
        )
        _memory.put(key, entry)
    return entry.images.clone(), entry.labels.clone()
