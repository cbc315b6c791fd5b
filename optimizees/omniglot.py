r"""Omniglot few-shot classification for MAML (Lake et al. 2015; Finn et al. 2017, §5.2).

**Data.** The two official zip files, ``images_background.zip`` (30 alphabets, 964 characters)
and ``images_evaluation.zip`` (20 alphabets, 659 characters), 20 drawings per character, are read
directly with :mod:`zipfile` (nothing is extracted to disk) from ``DIR/omniglot/`` or ``DIR``,
where ``DIR`` is the directory passed or ``$L2O_DATA`` (:func:`optimizees.data.resolve_data_dir`).
Nothing is downloaded. Each zip is checked against a known sha256 (or the md5 of the original
upstream zip), its 105×105 1-bit PNGs are decoded by a small built-in PNG reader
(:func:`decode_png`; no torchvision or PIL needed) and box-filtered to 28×28
(``F.interpolate(mode="area")``). Pixels are stored as *ink intensity*, uint8 0 (paper) .. 255
(ink); the network sees them as floats in [0, 1] (MAML's loader also feeds ``1 - image``).

Decoding all 32,460 PNGs takes seconds, so the decoded array of each zip is cached on disk as a
``.npz`` keyed by the zip's sha256 (see :func:`default_cache_dir`), written atomically, and kept
in memory for the life of the process.

**Classes and splits.** Every character is a class, and each rotation by a multiple of 90° is a
further class (Santoro et al. 2016; Finn et al. 2017). Characters are ordered by path, background
zip first (``images_background/<Alphabet>/characterNN`` sorted, then ``images_evaluation/...``
sorted), and split by position, deterministically and class-disjointly:

- ``"train"``: the first ``1200 - val_characters`` characters (default 1100),
- ``"val"``: the next ``val_characters`` (default 100), for model selection during meta-training,
- ``"test"``: the remaining 423 characters, held out.

So the 1200 meta-training characters (train + val) are all of background plus the first 236
evaluation characters (Angelic .. Gurmukhi ``character41``), as "the first 1200 characters" of
MAML's split; MAML itself shuffled the character folders (in file-system order, with Python's
``random.seed(1)``), which cannot be reproduced portably. The split is class-disjoint but not
alphabet-disjoint (Gurmukhi is cut in two), as in MAML. Rotations apply to every split.

**Episodes.** :class:`OmniglotFamily` samples an :class:`OmniglotTask` holding a meta-batch of
``B`` N-way K-shot episodes: per episode, N distinct (character, rotation) classes in random order
(so labels 0..N-1 are permuted per episode) and ``shots + query_shots`` distinct drawings of each,
split into a support set (split :data:`~l2o.tasks.TRAIN`, what the inner loop adapts on) and a
query set (split :data:`~l2o.tasks.META`, what the meta-loss reads).

**Network.** :class:`ConvNet` is the paper's 4-block network: 3×3 convolution with 64 filters,
batch normalisation with batch statistics (no running statistics), ReLU, 2×2 max-pooling
(28 → 14 → 7 → 3 → 1), then a linear layer to N ways. A task's params are its parameters with a
leading episode dimension ``B`` (each episode adapts its own copy), and ``loss`` evaluates all
episodes in one call, without a Python loop: by default with :func:`grouped_logits`, a pure
functional forward that stacks the episodes' channels and runs each layer once with grouped
convolutions, or (``forward="vmap"``) with :func:`torch.func.vmap` over
:func:`torch.func.functional_call` of :class:`ConvNet`; both give the same numbers (tested).
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import struct
import tempfile
import threading
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from l2o.cache import CACHE_ENV_VAR, default_cache_dir
from l2o.rules.base import check_positive_int
from l2o.tasks import support_or_query
from l2o.tree import Params

from .data import DataError, resolve_data_dir

__all__ = [
    "OMNIGLOT_FILES",
    "OMNIGLOT_SHA256",
    "OMNIGLOT_UPSTREAM_MD5",
    "META_TRAIN_CHARACTERS",
    "ROTATIONS",
    "CACHE_ENV_VAR",
    "OmniglotData",
    "EpisodeBatch",
    "EpisodeInfo",
    "ConvNet",
    "OmniglotTask",
    "OmniglotFamily",
    "decode_png",
    "read_omniglot_zip",
    "load_omniglot",
    "default_cache_dir",
    "split_characters",
    "grouped_logits",
    "vmap_logits",
    "episode_accuracy",
]

#: The two official zip files, background first (the order characters are numbered in).
OMNIGLOT_FILES: tuple[str, str] = ("images_background.zip", "images_evaluation.zip")

#: sha256 of the zips in the project's shared data (shared/data/README.md): the upstream images,
#: re-zipped deterministically (the upstream containers could not be recovered byte for byte).
OMNIGLOT_SHA256: dict[str, str] = {
    "images_background.zip": "512b4a2b61ff1c7d09db743d05d12aedc2a5f38192fa40d63fd91f0fc1504c88",
    "images_evaluation.zip": "98893e98e6c7ac15783039de81205741dffe6bb4ac1e1f0c5568f6889e7e523c",
}

#: md5 of the original upstream zips (github.com/brendenlake/omniglot, python/; the md5s that
#: torchvision checks); a zip with one of these passes verification too.
OMNIGLOT_UPSTREAM_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}

#: Characters (before rotation) meta-training may see: train + val; the rest are held out.
META_TRAIN_CHARACTERS = 1200

#: Rotations (degrees, counter-clockwise) that make new classes.
ROTATIONS: tuple[int, ...] = (0, 90, 180, 270)

#: Environment variable naming the cache directory when none is passed.

_SUBDIR = "omniglot"
_CACHE_FORMAT = 1
_BN_EPS = 1e-5
_FORWARDS = ("grouped", "vmap")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_HOW_TO_GET = (
    "Get images_background.zip and images_evaluation.zip from "
    "https://github.com/brendenlake/omniglot (folder python/) and put them, as they are (not "
    "extracted), in DIR/omniglot/ or DIR. The repository's developers find them in "
    "shared/data/omniglot."
)


# --------------------------------------------------------------------------------------------
# PNG decoding (grayscale, non-interlaced: what Omniglot uses)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unfilter(raw: np.ndarray, height: int, stride: int, bpp: int) -> np.ndarray:
    """Undo PNG scanline filters; ``raw`` holds ``height`` rows of ``1 + stride`` bytes."""
    rows = raw.reshape(height, stride + 1)
    kinds = rows[:, 0]
    out = rows[:, 1:].copy()
    if not kinds.any():  # every row unfiltered: the Omniglot case
        return out
    if int(kinds.max()) > 4:
        bad = int(np.flatnonzero(kinds > 4)[0])
        raise DataError(f"unknown PNG filter type {int(kinds[bad])} in row {bad}")
    prev = np.zeros(stride, dtype=np.uint8)
    for y in range(height):
        kind = int(kinds[y])
        line = out[y]
        if kind == 1:  # Sub
            for x in range(bpp, stride):
                line[x] = (int(line[x]) + int(line[x - bpp])) & 0xFF
        elif kind == 2:  # Up
            line += prev  # uint8 arithmetic wraps modulo 256, as PNG requires
        elif kind == 3:  # Average
            for x in range(stride):
                left = int(line[x - bpp]) if x >= bpp else 0
                line[x] = (int(line[x]) + ((left + int(prev[x])) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for x in range(stride):
                left = int(line[x - bpp]) if x >= bpp else 0
                upleft = int(prev[x - bpp]) if x >= bpp else 0
                line[x] = (int(line[x]) + _paeth(left, int(prev[x]), upleft)) & 0xFF
        prev = line
    return out


def decode_png(data: bytes) -> np.ndarray:
    """Decode a grayscale, non-interlaced PNG (bit depth 1, 2, 4 or 8) into a uint8 array.

    Chunk CRCs are checked; ancillary chunks (``tIME``, ``gAMA``, ...) are skipped.

    Args:
        data: the PNG file's bytes.

    Returns:
        An ``(height, width)`` uint8 array of gray levels scaled to 0 (black) .. 255 (white).

    Raises:
        DataError: not a PNG, a damaged one (bad CRC, truncated, corrupt deflate stream), or a
            kind this reader does not handle (colour, 16-bit, interlaced); the message says which.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be the PNG file's bytes, got {type(data).__name__}")
    data = bytes(data)
    if data[:8] != _PNG_SIGNATURE:
        raise DataError("not a PNG file (bad signature)")
    pos, header, idat = 8, None, []
    while True:
        if pos + 12 > len(data):
            raise DataError("truncated PNG: no IEND chunk")
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        end = pos + 12 + length
        if end > len(data):
            raise DataError(f"truncated PNG: chunk {kind!r} runs past the end of the file")
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[end - 4:end])
        if zlib.crc32(kind + body) != crc:
            raise DataError(f"damaged PNG: CRC mismatch in chunk {kind!r}")
        if kind == b"IHDR":
            if len(body) != 13:
                raise DataError(f"malformed PNG: the IHDR chunk has {len(body)} bytes, expected 13")
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        elif not kind[:1].islower():  # an unknown critical chunk (e.g. PLTE) cannot be skipped
            raise DataError(f"unsupported PNG: critical chunk {kind!r}")
        pos = end
    if header is None or not idat:
        raise DataError("malformed PNG: missing IHDR or IDAT")
    width, height, depth, color, compression, filtering, interlace = header
    if color != 0 or depth not in (1, 2, 4, 8) or compression or filtering or interlace:
        raise DataError(
            "unsupported PNG: expected non-interlaced grayscale (colour type 0) with bit depth "
            f"1, 2, 4 or 8, found colour type {color}, bit depth {depth}, interlace {interlace}"
        )
    try:
        raw = zlib.decompress(b"".join(idat))
    except zlib.error as exc:
        raise DataError(f"damaged PNG: corrupt deflate stream ({exc})") from exc
    stride = (width * depth + 7) // 8
    if len(raw) != height * (stride + 1):
        raise DataError(
            f"malformed PNG: {width}x{height} at {depth} bit needs {height * (stride + 1)} "
            f"bytes of scanlines, found {len(raw)}"
        )
    rows = _unfilter(np.frombuffer(raw, dtype=np.uint8), height, stride, max(1, depth // 8))
    if depth == 8:
        return rows
    if depth == 1:
        return np.unpackbits(rows, axis=1, count=width) * np.uint8(255)
    per_byte = 8 // depth
    shifts = np.arange(8 - depth, -1, -depth, dtype=np.uint8)  # most significant first
    levels = (rows[:, :, None] >> shifts) & np.uint8((1 << depth) - 1)
    levels = levels.reshape(height, stride * per_byte)[:, :width]
    return (levels.astype(np.uint16) * 255 // ((1 << depth) - 1)).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Reading the zips


class OmniglotData(NamedTuple):
    """Decoded Omniglot characters.

    Attributes:
        images: ``(characters, drawings, size, size)`` uint8 ink intensities (0 paper, 255 ink).
        characters: one ``"<zip stem>/<Alphabet>/characterNN"`` name per character, in order.
    """

    images: Tensor
    characters: tuple[str, ...]


def _hashes(path: Path) -> tuple[str, str]:
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def _verify(path: Path, sha256: str, md5: str) -> None:
    name = path.name
    expected = OMNIGLOT_SHA256.get(name)
    if expected is None:
        raise DataError(
            f"{path}: no known checksum for a file named {name!r} (expected one of "
            f"{', '.join(OMNIGLOT_FILES)}); pass verify=False to read it anyway"
        )
    if sha256 == expected or md5 == OMNIGLOT_UPSTREAM_MD5.get(name):
        return
    raise DataError(
        f"{path}: checksum mismatch for Omniglot {name}: expected sha256 {expected} (the "
        f"project's copy) or md5 {OMNIGLOT_UPSTREAM_MD5.get(name)} (the upstream zip), found "
        f"sha256 {sha256}, md5 {md5}. The file is damaged or is not the published data; remove "
        f"it and get it again ({_HOW_TO_GET}) or pass verify=False to skip this check."
    )


def _decode_zip(path: Path, image_size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Decode every ``<root>/<Alphabet>/<character>/<drawing>.png`` of the zip at ``path``."""
    try:
        archive = zipfile.ZipFile(path)
    # a damaged central directory: BadZipFile, or an unknown zip version (NotImplementedError), an
    # undecodable UTF-8 name (UnicodeDecodeError, a ValueError), a short read (EOFError)
    except (zipfile.BadZipFile, OSError, NotImplementedError, ValueError, EOFError) as exc:
        raise DataError(
            f"{path}: not a readable zip file ({exc}); expected the Omniglot zip "
            f"{path.name}. {_HOW_TO_GET}"
        ) from exc
    with archive:
        groups: dict[str, list[zipfile.ZipInfo]] = {}
        for info in archive.infolist():
            parts = info.filename.split("/")
            # (not info.is_dir(): it fails on the empty name a damaged central directory can hold)
            if info.filename.endswith("/") or len(parts) != 4 or not parts[3].endswith(".png") or parts[0] == "__MACOSX":
                continue
            groups.setdefault("/".join(parts[:3]), []).append(info)
        if not groups:
            raise DataError(
                f"{path}: no images found: expected entries <root>/<Alphabet>/<character>/"
                f"<drawing>.png as in the official {path.name}. {_HOW_TO_GET}"
            )
        characters = tuple(sorted(groups))
        counts = {len(groups[c]) for c in characters}
        if len(counts) != 1:
            few = min(characters, key=lambda c: len(groups[c]))
            raise DataError(
                f"{path}: characters have different numbers of drawings ({sorted(counts)}), "
                f"e.g. {few} has {len(groups[few])}; expected the same number for every "
                f"character (20 in the official zips). {_HOW_TO_GET}"
            )
        drawings = counts.pop()
        out = np.empty((len(characters), drawings, image_size, image_size), dtype=np.uint8)
        chunk = max(1, 512 // drawings)  # characters resized per interpolate call
        for start in range(0, len(characters), chunk):
            block = []
            for name in characters[start:start + chunk]:
                for info in sorted(groups[name], key=lambda i: i.filename):
                    try:
                        pixels = decode_png(archive.read(info))
                    # a damaged entry: bad CRC or stream (BadZipFile, zlib.error, EOFError), a flipped
                    # compression-method (NotImplementedError), encryption flag (RuntimeError) or name
                    # flag (UnicodeDecodeError, a ValueError)
                    except (DataError, zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError,
                            RuntimeError, ValueError) as exc:
                        raise DataError(
                            f"{path}: damaged entry {info.filename} ({exc}). {_HOW_TO_GET}"
                        ) from exc
                    if block and pixels.shape != block[0].shape:
                        raise DataError(
                            f"{path}: {info.filename} is {pixels.shape[1]}x{pixels.shape[0]}, "
                            f"expected {block[0].shape[1]}x{block[0].shape[0]} like the others"
                        )
                    block.append(pixels)
            ink = torch.from_numpy(np.subtract(np.uint8(255), np.stack(block))).float()
            small = F.interpolate(ink.unsqueeze(1), size=(image_size, image_size), mode="area")
            small = small.round_().clamp_(0, 255).to(torch.uint8).squeeze(1)
            n = len(block) // drawings
            out[start:start + n] = small.reshape(n, drawings, image_size, image_size).numpy()
    return out, characters


def _cache_file(cache_dir: Path, path: Path, sha256: str, image_size: int) -> Path:
    return cache_dir / f"omniglot-{path.stem}-{sha256[:16]}-{image_size}px-v{_CACHE_FORMAT}.npz"


def _load_cached(file: Path, image_size: int) -> tuple[np.ndarray, tuple[str, ...]] | None:
    """The cached arrays, or None when absent or unusable (it is then rebuilt)."""
    if not file.is_file():
        return None
    try:
        with np.load(file, allow_pickle=False) as npz:
            images, names = npz["images"], npz["characters"]
    except Exception:  # noqa: BLE001 - any unreadable cache file is simply rebuilt
        return None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[2:] != (image_size, image_size)
            or names.ndim != 1 or names.shape[0] != images.shape[0]):
        return None
    return images, tuple(str(n) for n in names)


def _save_cached(file: Path, images: np.ndarray, characters: tuple[str, ...]) -> None:
    """Write atomically (temporary file + rename); warn and carry on if the cache is unwritable."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, images=images, characters=np.array(characters, dtype=str))
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        warnings.warn(f"could not write the Omniglot cache {file} ({exc}); decoding again next time",
                      RuntimeWarning, stacklevel=3)


class _Decoded(NamedTuple):
    sha256: str
    md5: str
    images: np.ndarray
    characters: tuple[str, ...]


# In-process copies, keyed by (resolved path, mtime, size, image size): a second read of an
# unchanged file neither hashes nor decodes it again.
_memory: dict[tuple[str, int, int, int], _Decoded] = {}
_memory_lock = threading.Lock()


def _clear_cache() -> None:
    """Forget the in-process copies (for tests and long-lived processes); disk caches stay."""
    with _memory_lock:
        _memory.clear()


def read_omniglot_zip(
    path: str | os.PathLike[str],
    *,
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None | bool = None,
    image_size: int = 28,
) -> OmniglotData:
    """Decode one Omniglot zip (``images_background.zip`` or ``images_evaluation.zip``).

    Characters are the folders ``<root>/<Alphabet>/<character>`` in sorted order, drawings the
    PNGs inside each in sorted order; every character must have the same number of drawings.
    Other entries (directories, ``.DS_Store``, ``__MACOSX/``) are ignored. The decoded array is
    also kept in-process per (resolved path, mtime, size), so reading an unchanged file again
    neither hashes nor decodes it (about 0.03 s against 0.1 s from the disk cache and 2-3 s
    decoding, for both official zips on one CPU thread).

    Args:
        path: the zip file.
        verify: check the file against :data:`OMNIGLOT_SHA256` (or the upstream md5 in
            :data:`OMNIGLOT_UPSTREAM_MD5`); the file must then have one of the official names.
        cache_dir: where the decoded array is cached (a ``.npz`` named after the zip's sha256,
            so a changed zip never reads a stale cache); None means :func:`default_cache_dir`,
            False disables the disk cache. An unwritable cache only warns.
        image_size: side of the resized square images.

    Returns:
        :class:`OmniglotData` with a fresh ``images`` tensor the caller may modify.

    Raises:
        DataError: the file is missing, is not a zip, fails verification, has no images in the
            expected layout, or holds a damaged or unsupported PNG; the message names the file
            and says how to get the official one.
    """
    _check_read_args(path, verify, cache_dir)
    path = Path(path).expanduser()
    size = check_positive_int("image_size", image_size)
    if not path.is_file():
        raise DataError(f"{path}: Omniglot file not found. {_HOW_TO_GET}")
    resolved = path.resolve()
    stat = resolved.stat()
    key = (str(resolved), stat.st_mtime_ns, stat.st_size, size)
    with _memory_lock:
        hit = _memory.get(key)
    if hit is None:
        sha256, md5 = _hashes(path)
        if verify:
            _verify(path, sha256, md5)
        cache = None if cache_dir is False else (
            default_cache_dir() if cache_dir is None or cache_dir is True else Path(cache_dir).expanduser())
        file = _cache_file(cache, path, sha256, size) if cache is not None else None
        arrays = _load_cached(file, size) if file is not None else None
        if arrays is None:
            arrays = _decode_zip(path, size)
            if file is not None:
                _save_cached(file, *arrays)
        hit = _Decoded(sha256, md5, *arrays)
        with _memory_lock:
            _memory[key] = hit
    elif verify:
        _verify(path, hit.sha256, hit.md5)
    return OmniglotData(torch.from_numpy(hit.images.copy()), hit.characters)


def _check_read_args(path: Any, verify: Any, cache_dir: Any) -> None:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a file path (str or os.PathLike), got {type(path).__name__} ({path!r})")
    if not isinstance(verify, bool):
        raise TypeError(f"verify must be a bool, got {type(verify).__name__} ({verify!r})")
    if cache_dir is not None and not isinstance(cache_dir, (bool, str, os.PathLike)):
        raise TypeError(f"cache_dir must be a directory path, None (the default cache) or False (no cache), got "
                        f"{type(cache_dir).__name__} ({cache_dir!r})")


def _locate(root: Path) -> list[Path]:
    searched = []
    for directory in (root / _SUBDIR, root):
        found = [directory / name for name in OMNIGLOT_FILES]
        if all(p.is_file() for p in found):
            return found
        missing = ", ".join(p.name for p in found if not p.is_file())
        state = "" if directory.is_dir() else " (directory does not exist)"
        searched.append(f"  {directory}{state}: missing {missing}")
    raise DataError(
        "Omniglot files not found: no directory searched holds both "
        + " and ".join(OMNIGLOT_FILES) + ".\nSearched:\n" + "\n".join(searched) + f"\n{_HOW_TO_GET}"
    )


def load_omniglot(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
    cache_dir: str | os.PathLike[str] | None | bool = None,
    image_size: int = 28,
) -> OmniglotData:
    """Load all 1623 Omniglot characters: background's characters, then evaluation's.

    Both zips are looked for in ``DIR/omniglot/`` and then ``DIR``; see
    :func:`read_omniglot_zip` for ``verify``, ``cache_dir`` and ``image_size``.

    Args:
        data_dir: the data directory; None means ``$L2O_DATA``.

    Returns:
        :class:`OmniglotData`, images of shape ``(1623, 20, image_size, image_size)`` for the
        official files.

    Raises:
        DataError: no data directory, missing files (with the directories searched and how to
            get them), or any error of :func:`read_omniglot_zip`.
    """
    _check_read_args("", verify, cache_dir)
    check_positive_int("image_size", image_size)
    paths = _locate(resolve_data_dir(data_dir))
    parts = [read_omniglot_zip(p, verify=verify, cache_dir=cache_dir, image_size=image_size) for p in paths]
    if parts[0].images.shape[1:] != parts[1].images.shape[1:]:
        raise DataError(
            f"{paths[0]} and {paths[1]} disagree: drawings of shape {tuple(parts[0].images.shape[1:])} "
            f"vs {tuple(parts[1].images.shape[1:])}; expected 20 drawings per character in both"
        )
    return OmniglotData(torch.cat([p.images for p in parts]), parts[0].characters + parts[1].characters)


def split_characters(num_characters: int, split: str, val_characters: int = 100) -> range:
    """Positions of the characters in ``split`` (see the module doc).

    ``"train"``: ``[0, 1200 - val_characters)``, ``"val"``: ``[1200 - val_characters, 1200)``,
    ``"test"``: ``[1200, num_characters)``. The boundary shrinks to ``num_characters`` when
    there are fewer characters (small test data).
    """
    if not isinstance(split, str) or split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of 'train', 'val', 'test', got {split!r}")
    if isinstance(num_characters, bool) or not isinstance(num_characters, int) or num_characters < 0:
        raise ValueError(f"num_characters must be an int >= 0, got {num_characters!r}")
    if (isinstance(val_characters, bool) or not isinstance(val_characters, int)
            or not 0 <= val_characters < META_TRAIN_CHARACTERS):
        raise ValueError(f"val_characters must be an int in [0, {META_TRAIN_CHARACTERS}), got {val_characters!r}")
    meta = min(META_TRAIN_CHARACTERS, num_characters)
    train = max(0, meta - val_characters)
    return {"train": range(0, train), "val": range(train, meta), "test": range(meta, num_characters)}[split]


# --------------------------------------------------------------------------------------------
# The network


class ConvNet(nn.Module):
    """The 4-block convolutional network of Finn et al. (2017) for one episode.

    Each block: 3×3 convolution (``channels`` filters, padding 1), batch normalisation using the
    batch's own statistics (``track_running_stats=False``: the same in train and eval mode, no
    buffers), ReLU, 2×2 max-pooling. Then the features are flattened and a linear layer maps them
    to ``ways`` logits. Input ``(M, in_channels, image_size, image_size)``, output ``(M, ways)``.

    Parameter names: ``blocks.{i}.conv.{weight,bias}``, ``blocks.{i}.norm.{weight,bias}``,
    ``classifier.{weight,bias}``.
    """

    def __init__(self, ways: int = 5, *, channels: int = 64, num_blocks: int = 4,
                 in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        self.ways = check_positive_int("ways", ways)
        check_positive_int("channels", channels)
        check_positive_int("num_blocks", num_blocks)
        check_positive_int("in_channels", in_channels)
        side = check_positive_int("image_size", image_size)
        blocks = []
        for i in range(num_blocks):
            blocks.append(nn.ModuleDict({
                "conv": nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1),
                "norm": nn.BatchNorm2d(channels, eps=_BN_EPS, track_running_stats=False),
            }))
            side //= 2
        if side < 1:
            raise ValueError(f"image_size {image_size} is too small for {num_blocks} 2x2 max-pools")
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Linear(channels * side * side, self.ways)
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = F.max_pool2d(F.relu(block["norm"](block["conv"](x))), 2)
        return self.classifier(x.flatten(1))

    def params(self) -> Params:
        """The module's parameters as a params dict (the live ``nn.Parameter`` objects, not copies:
        what a MAML module holds as θ0 and broadcasts to a meta-batch)."""
        return dict(self.named_parameters())

    def init_params(self, generator: torch.Generator | None = None, batch_size: int | None = None,
                    dtype: torch.dtype | None = None) -> Params:
        """Fresh params drawn as in MAML's code (on the module's device, in ``dtype`` or its own).

        Convolutions: Glorot-uniform weights (TF's ``xavier_initializer_conv2d``), zero biases;
        batch norm: weight 1, bias 0; classifier: standard-normal weights (MAML's ``w5`` for
        Omniglot), zero bias. With ``batch_size`` ``B`` every tensor is ``(B, *shape)`` and the
        ``B`` networks are drawn independently. Deterministic for a seeded ``generator``.
        """
        lead = () if batch_size is None else (check_positive_int("batch_size", batch_size),)
        out: Params = {}
        for name, p in self.named_parameters():
            shape, dt = lead + tuple(p.shape), dtype or p.dtype
            if name.endswith("conv.weight"):
                fan_in, fan_out = p.shape[1] * p[0, 0].numel(), p.shape[0] * p[0, 0].numel()
                bound = math.sqrt(6.0 / (fan_in + fan_out))
                value = (torch.rand(shape, generator=generator, dtype=dt) * 2 - 1) * bound
            elif name.endswith("norm.weight"):
                value = torch.ones(shape, dtype=dt)
            elif name == "classifier.weight":
                value = torch.randn(shape, generator=generator, dtype=dt)
            else:  # biases
                value = torch.zeros(shape, dtype=dt)
            out[name] = value.to(p.device)
        return out

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the module's own parameters with :meth:`init_params`."""
        with torch.no_grad():
            for name, value in self.init_params(generator).items():
                self.get_parameter(name).copy_(value)


def vmap_logits(net: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """Logits ``(B, M, ways)`` of ``net`` run with per-episode ``params`` (leading dim ``B``) on
    ``inputs`` ``(B, M, C, H, W)``: :func:`torch.func.vmap` over ``functional_call``.

    Works for any module; for :class:`ConvNet` params, :func:`grouped_logits` computes the same
    thing faster.
    """
    def one(p: Params, x: Tensor) -> Tensor:
        return functional_call(net, p, (x,))

    return vmap(one)(dict(params), inputs)


def grouped_logits(params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    """:class:`ConvNet`'s forward for ``B`` episodes at once, as a pure function.

    The ``B`` episodes' channels are stacked into one image batch ``(M, B*C, H, W)``: each
    convolution is a single grouped convolution (``groups=B``), batch norm over ``(M, H, W)`` per
    (episode, channel) is one ``F.batch_norm`` call, and the classifier an ``einsum``. Equal to
    :func:`vmap_logits` over :class:`ConvNet` (tested), with fewer copies (about 1.3x faster on a
    second-order MAML step on CPU).

    Args:
        params: :class:`ConvNet` params with a leading episode dimension ``B``.
        inputs: ``(B, M, C, H, W)``; every episode has the same number ``M`` of images.

    Returns:
        Logits ``(B, M, ways)``.
    """
    if inputs.dim() != 5:
        raise ValueError(f"inputs must have shape (B, M, C, H, W), got {tuple(inputs.shape)}")
    b, m = inputs.shape[:2]
    weight = params["classifier.weight"]
    if weight.dim() != 3 or weight.shape[0] != b:
        raise ValueError(f"params must have a leading episode dimension of {b} (the inputs'), "
                         f"got classifier.weight of shape {tuple(weight.shape)}")
    h = inputs.transpose(0, 1).reshape(m, b * inputs.shape[2], *inputs.shape[3:])
    i = 0
    while f"blocks.{i}.conv.weight" in params:
        w = params[f"blocks.{i}.conv.weight"]
        h = F.conv2d(h, w.reshape(-1, *w.shape[2:]), params[f"blocks.{i}.conv.bias"].reshape(-1),
                     padding=1, groups=b)
        h = F.batch_norm(h, None, None, params[f"blocks.{i}.norm.weight"].reshape(-1),
                         params[f"blocks.{i}.norm.bias"].reshape(-1), training=True, eps=_BN_EPS)
        h = F.max_pool2d(F.relu(h), 2)
        i += 1
    features = h.reshape(m, b, -1)
    return torch.einsum("mbf,bnf->bmn", features, weight) + params["classifier.bias"].unsqueeze(1)


def episode_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct predictions per episode: ``(B, M, ways)``, ``(B, M)`` -> ``(B,)``."""
    return (logits.argmax(-1) == labels).to(logits.dtype).mean(-1)


# --------------------------------------------------------------------------------------------
# Tasks


class EpisodeBatch(NamedTuple):
    """Images ``(B, M, 1, S, S)`` (float, ink 1) and labels ``(B, M)`` (int64 in 0..ways-1)."""

    inputs: Tensor
    labels: Tensor


class EpisodeInfo(NamedTuple):
    """Where a task's images came from (for checks and debugging).

    Attributes:
        characters: ``(B, ways)`` indices into the family's :attr:`OmniglotFamily.characters`;
            column ``n`` is the class labelled ``n``.
        quarter_turns: ``(B, ways)`` counter-clockwise rotations of each class, in quarter turns.
        drawings: ``(B, ways, shots + query_shots)`` drawing indices; the first ``shots`` make
            the support set.
    """

    characters: Tensor
    quarter_turns: Tensor
    drawings: Tensor


class OmniglotTask:
    """A meta-batch of ``B`` N-way episodes with per-episode params (see the module doc).

    ``sample_batch(TRAIN, g)`` is the support set and ``sample_batch(META, g)`` the query set
    (fixed per task; the generator is not used). Params carry a leading episode dimension.

    Args:
        support: the support set (what the inner loop adapts on).
        query: the query set (what the meta-loss and accuracy read).
        model: the single-episode network whose structure the params follow (its own parameters
            are never used: params are passed functionally).
        forward: ``"grouped"`` (:func:`grouped_logits`, the default) or ``"vmap"``
            (:func:`vmap_logits`); the same numbers either way.
        info: where the episodes came from, when sampled by :class:`OmniglotFamily`.
    """

    def __init__(self, support: EpisodeBatch, query: EpisodeBatch, model: ConvNet,
                 forward: str = "grouped", info: EpisodeInfo | None = None) -> None:
        if forward not in _FORWARDS:
            raise ValueError(f"forward must be one of {_FORWARDS}, got {forward!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (a ConvNet), got {type(model).__name__}")
        for name, batch in (("support", support), ("query", query)):
            if not (isinstance(getattr(batch, "inputs", None), Tensor) and isinstance(getattr(batch, "labels", None), Tensor)):
                raise TypeError(f"{name} must be an EpisodeBatch(inputs, labels) of tensors, got {type(batch).__name__}")
            if batch.inputs.dim() != 5 or batch.labels.shape != batch.inputs.shape[:2]:
                raise ValueError(
                    f"{name} must hold inputs (B, M, C, H, W) and labels (B, M), got "
                    f"{tuple(batch.inputs.shape)} and {tuple(batch.labels.shape)}"
                )
            if not batch.inputs.is_floating_point() or batch.labels.dtype != torch.int64:
                raise TypeError(f"{name} must hold floating-point inputs and int64 labels, got {batch.inputs.dtype} "
                                f"and {batch.labels.dtype}")
            if batch.labels.numel() == 0:
                raise ValueError(f"{name} must hold at least one episode with at least one image, got inputs of "
                                 f"shape {tuple(batch.inputs.shape)}")
        if support.inputs.shape[0] != query.inputs.shape[0]:
            raise ValueError(f"support and query have different episode counts: "
                             f"{support.inputs.shape[0]} vs {query.inputs.shape[0]}")
        self.support = support
        self.query = query
        self.model = model
        self.forward = forward
        self.info = info

    @property
    def num_tasks(self) -> int:
        """``B``, the number of episodes held (named like ``SineTask.num_tasks``)."""
        return self.support.inputs.shape[0]

    @property
    def ways(self) -> int:
        return self.model.ways

    def init(self, generator: torch.Generator) -> Params:
        """Independent networks initialised as in MAML's code, one per episode: ``(B, *shape)``.

        See :meth:`ConvNet.init_params`; params take the images' dtype and device.
        """
        params = self.model.init_params(generator, self.num_tasks, dtype=self.support.inputs.dtype)
        return {k: v.to(self.support.inputs.device) for k, v in params.items()}

    def sample_batch(self, split: str, generator: torch.Generator | None = None) -> EpisodeBatch:
        """The support set for :data:`~l2o.tasks.TRAIN`, the query set for :data:`~l2o.tasks.META`."""
        return support_or_query(split, self.support, self.query)

    def logits(self, params: Params, inputs: Tensor) -> Tensor:
        """Per-episode logits ``(B, M, ways)``."""
        if self.forward == "vmap":
            return vmap_logits(self.model, params, inputs)
        return grouped_logits(params, inputs)

    def loss(self, params: Params, batch: EpisodeBatch) -> Tensor:
        """Mean cross-entropy of each episode, shape ``(B,)`` (all episodes in one call, no loop)."""
        logits = self.logits(params, batch.inputs)
        return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), reduction="none").view(
            batch.labels.shape).mean(-1)

    def accuracy(self, params: Params, batch: EpisodeBatch | None = None) -> Tensor:
        """Per-episode accuracy ``(B,)`` on ``batch`` (default: the query set), without grad."""
        batch = self.query if batch is None else batch
        with torch.no_grad():
            return episode_accuracy(self.logits(params, batch.inputs), batch.labels)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "OmniglotTask":
        """A copy of the task's data (and its model) on another device and/or floating dtype."""
        def cast(b: EpisodeBatch) -> EpisodeBatch:
            return EpisodeBatch(b.inputs.to(device=device, dtype=dtype), b.labels.to(device=device))

        model = copy.deepcopy(self.model).to(device=device, dtype=dtype)
        info = None if self.info is None else EpisodeInfo(*(t.to(device=device) for t in self.info))
        return OmniglotTask(cast(self.support), cast(self.query), model, self.forward, info)


def _check_data(data: Any) -> None:
    """``data`` must look like :class:`OmniglotData`: uint8 images ``(characters, drawings, S, S)``, one name each."""
    images = getattr(data, "images", None)
    characters = getattr(data, "characters", None)
    if not isinstance(images, Tensor) or not isinstance(characters, (tuple, list)):
        raise TypeError(f"data must be an OmniglotData (images, characters), got {type(data).__name__}")
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"data.images must be uint8 ink intensities of shape (characters, drawings, size, size), "
                         f"got {images.dtype} of shape {tuple(images.shape)}")
    if len(characters) != images.shape[0]:
        raise ValueError(f"data.characters names {len(characters)} characters but data.images holds "
                         f"{images.shape[0]}")


class OmniglotFamily:
    """Samples :class:`OmniglotTask` meta-batches of N-way K-shot Omniglot episodes.

    Args:
        data_dir: directory holding the zips (or its ``omniglot/`` subfolder); None: ``$L2O_DATA``.
        ways: N, classes per episode.
        shots: K, support drawings per class.
        query_shots: query drawings per class (MAML: 15 for 5-way; needs shots + query_shots <= 20).
        meta_batch_size: episodes per task, B (MAML: 32 for 5-way 1-shot).
        split: ``"train"``, ``"val"`` or ``"test"`` (see the module doc for the characters).
        val_characters: characters of the 1200 meta-training ones kept for ``"val"`` (default 100).
        rotations: rotations (multiples of 90°) that each make a class of every character.
        channels: filters per convolution (MAML: 64).
        dtype, device: of the images and params.
        forward: how tasks evaluate all episodes at once, ``"grouped"`` or ``"vmap"`` (see
            :class:`OmniglotTask`).
        verify, cache_dir: see :func:`read_omniglot_zip`.
        data: already-loaded :class:`OmniglotData` (instead of reading ``data_dir``).

    Raises:
        ValueError: an argument out of range (named in the message), or a split with fewer
            classes than ``ways`` or characters with fewer drawings than ``shots + query_shots``.
        DataError: the data cannot be read (see :func:`load_omniglot`).
    """

    name = "omniglot"

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        ways: int = 5,
        shots: int = 1,
        query_shots: int = 15,
        meta_batch_size: int = 32,
        split: str = "train",
        *,
        val_characters: int = 100,
        rotations: Sequence[int] = ROTATIONS,
        channels: int = 64,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        forward: str = "grouped",
        verify: bool = True,
        cache_dir: str | os.PathLike[str] | None | bool = None,
        data: OmniglotData | None = None,
    ) -> None:
        self.ways = check_positive_int("ways", ways)
        self.shots = check_positive_int("shots", shots)
        self.query_shots = check_positive_int("query_shots", query_shots)
        self.meta_batch_size = check_positive_int("meta_batch_size", meta_batch_size)
        self.channels = check_positive_int("channels", channels)
        if isinstance(rotations, (str, bytes)) or not isinstance(rotations, Sequence):
            raise ValueError(f"rotations must be a sequence of distinct values from {ROTATIONS}, got {rotations!r}")
        rot = tuple(rotations)
        if not rot or len(set(rot)) != len(rot) or any(
                isinstance(r, bool) or not isinstance(r, int) or r not in ROTATIONS for r in rot):
            raise ValueError(f"rotations must be distinct values from {ROTATIONS}, got {rotations!r}")
        if forward not in _FORWARDS:
            raise ValueError(f"forward must be one of {_FORWARDS}, got {forward!r}")
        self.forward = forward
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        try:
            device = torch.device(device) if device is not None else torch.device("cpu")
            torch.empty(0, device=device)  # an unavailable device (CUDA in a CPU build) fails here, by name
        except (RuntimeError, TypeError, AssertionError) as exc:
            raise ValueError(f"device must be an available torch.device or a device string such as 'cpu', got "
                             f"{device!r} ({exc})") from None
        if data is None:
            data = load_omniglot(data_dir, verify=verify, cache_dir=cache_dir)
        _check_data(data)
        positions = split_characters(data.images.shape[0], split, val_characters)
        self.split = split
        self.val_characters = val_characters
        self.rotations = rot
        self.dtype = dtype
        self.device = device
        #: names of the characters this family draws from (before rotation), in order.
        self.characters: tuple[str, ...] = tuple(data.characters[i] for i in positions)
        self.images = data.images[positions.start:positions.stop].to(self.device)
        num_classes = len(self.characters) * len(rot)
        if num_classes < self.ways:
            raise ValueError(
                f"ways={ways} exceeds the {num_classes} classes of split {split!r} "
                f"({len(self.characters)} characters x {len(rot)} rotations)"
            )
        drawings = data.images.shape[1]
        if self.shots + self.query_shots > drawings:
            raise ValueError(
                f"shots + query_shots must be <= {drawings} (drawings per character), got "
                f"{shots} + {query_shots}"
            )
        self._model = self.model()

    def model(self) -> ConvNet:
        """A fresh :class:`ConvNet` of this family's architecture, dtype and device (e.g. to hold
        MAML's θ0)."""
        return ConvNet(self.ways, channels=self.channels, image_size=self.images.shape[-1]).to(
            device=self.device, dtype=self.dtype)

    @property
    def num_classes(self) -> int:
        """Classes in this split: characters × rotations."""
        return len(self.characters) * len(self.rotations)

    def sample_classes(self, generator: torch.Generator, episodes: int) -> tuple[Tensor, Tensor]:
        """``(characters, rotations)`` of ``(episodes, ways)`` distinct classes per episode.

        Characters are indices into :attr:`characters`; rotations are quarter turns (0..3).
        The order within an episode is random, so it defines a random labelling.
        """
        scores = torch.rand(episodes, self.num_classes, generator=generator)
        classes = scores.argsort(-1)[:, :self.ways]
        quarter = torch.tensor([r // 90 for r in self.rotations])
        return classes // len(self.rotations), quarter[classes % len(self.rotations)]

    def sample(self, generator: torch.Generator, num_tasks: int | None = None) -> OmniglotTask:
        """Draw a task of ``num_tasks`` episodes (default: ``meta_batch_size``)."""
        b = self.meta_batch_size if num_tasks is None else check_positive_int("num_tasks", num_tasks)
        chars, quarters = self.sample_classes(generator, b)
        n_draw = self.shots + self.query_shots
        draws = torch.rand(b, self.ways, self.images.shape[1], generator=generator).argsort(-1)[..., :n_draw]
        chars, quarters, draws = chars.to(self.device), quarters.to(self.device), draws.to(self.device)
        x = self.images[chars.unsqueeze(-1), draws]  # (B, N, K+Q, S, S) uint8
        for q in range(1, 4):
            mask = quarters == q
            if bool(mask.any()):
                x[mask] = torch.rot90(x[mask], q, dims=(-2, -1))
        x = x.to(self.dtype).div_(255.0).unsqueeze(-3)  # (B, N, K+Q, 1, S, S)
        labels = torch.arange(self.ways, device=self.device).view(1, self.ways, 1).expand(b, self.ways, n_draw)

        def part(sl: slice) -> EpisodeBatch:
            return EpisodeBatch(x[:, :, sl].flatten(1, 2).contiguous(), labels[:, :, sl].flatten(1, 2).contiguous())

        return OmniglotTask(part(slice(0, self.shots)), part(slice(self.shots, n_draw)), self._model,
                            self.forward, EpisodeInfo(chars, quarters, draws))

    def config(self) -> dict[str, Any]:
        """The family's settings as plain data (for checkpoints' provenance)."""
        return {"ways": self.ways, "shots": self.shots, "query_shots": self.query_shots,
                "meta_batch_size": self.meta_batch_size, "split": self.split,
                "val_characters": self.val_characters, "rotations": list(self.rotations),
                "channels": self.channels}
