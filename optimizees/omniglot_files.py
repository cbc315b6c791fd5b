r"""The Omniglot data files: finding the two official zips, checking them, decoding and caching them.

The two zips, ``images_background.zip`` (30 alphabets, 964 characters) and
``images_evaluation.zip`` (20 alphabets, 659 characters), 20 drawings per character, are read
directly with :mod:`zipfile` (nothing is extracted to disk) from ``DIR/omniglot/`` or ``DIR``,
where ``DIR`` is the directory passed or ``$L2O_DATA`` (:mod:`optimizees.datafiles`). Nothing is
downloaded. Each zip is checked against the md5 of the published zip (or the sha256 of a
deterministic re-zip of the same images), its 105×105 1-bit PNGs are decoded by
:func:`~optimizees.png.decode_png` (no torchvision or PIL needed) and box-filtered to 28×28
(``F.interpolate(mode="area")``). Pixels are stored as *ink intensity*, uint8 0 (paper) .. 255
(ink).

Decoding all 32,460 PNGs takes seconds, so the decoded array of each zip is cached on disk as a
``.npz`` keyed by the zip's sha256 (under :func:`l2o.cache.default_cache_dir`), written
atomically, and kept in memory for the life of the process (:mod:`optimizees.datafiles`).

Characters are the folders ``<root>/<Alphabet>/<character>`` of a zip in sorted order, background
first (:func:`load_omniglot`); :mod:`optimizees.omniglot` splits them and samples episodes.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from l2o.validation import check_bool, check_path, check_positive_int

from .datafiles import (DataError, DataSource, Memo, cached_arrays, check_cache_dir, checksum_mismatch, file_hashes,
                        file_key, locate, resolve_cache_dir, resolve_data_dir)
from .png import decode_png

__all__ = [
    "OMNIGLOT_FILES",
    "OMNIGLOT_SHA256",
    "OMNIGLOT_UPSTREAM_MD5",
    "OMNIGLOT_SOURCE",
    "OmniglotData",
    "read_omniglot_zip",
    "load_omniglot",
]

#: The two official zip files, background first (the order characters are numbered in).
OMNIGLOT_FILES: tuple[str, str] = ("images_background.zip", "images_evaluation.zip")

#: sha256 of a deterministic re-zip of the published images (the published zips' own bytes are
#: checked by :data:`OMNIGLOT_UPSTREAM_MD5`); a zip with one of these passes verification.
OMNIGLOT_SHA256: dict[str, str] = {
    "images_background.zip": "512b4a2b61ff1c7d09db743d05d12aedc2a5f38192fa40d63fd91f0fc1504c88",
    "images_evaluation.zip": "98893e98e6c7ac15783039de81205741dffe6bb4ac1e1f0c5568f6889e7e523c",
}

#: md5 of the published zips (github.com/brendenlake/omniglot, python/; the md5s that
#: torchvision checks); a zip with one of these passes verification too.
OMNIGLOT_UPSTREAM_MD5: dict[str, str] = {
    "images_background.zip": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation.zip": "6b91aef0f799c5bb55b94e3f2daec811",
}

#: Where users get the zips and where to put them.
OMNIGLOT_SOURCE = DataSource(
    title="Omniglot",
    subdir="omniglot",
    how_to_get=(
        "Get images_background.zip and images_evaluation.zip from "
        "https://github.com/brendenlake/omniglot (folder python/) and put them, as they are (not "
        "extracted), in DIR/omniglot/ or DIR; torchvision.datasets.Omniglot(ROOT, download=True) "
        "also leaves these two zips in ROOT/omniglot-py/, which can be passed as DIR."
    ),
)
_HOW_TO_GET = OMNIGLOT_SOURCE.how_to_get
_CACHE_FORMAT = 1


class OmniglotData(NamedTuple):
    """Decoded Omniglot characters.

    Attributes:
        images: ``(characters, drawings, size, size)`` uint8 ink intensities (0 paper, 255 ink).
        characters: one ``"<zip stem>/<Alphabet>/characterNN"`` name per character, in order.
    """

    images: Tensor
    characters: tuple[str, ...]


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
    raise checksum_mismatch(
        path, what=f"Omniglot {name}", kind="checksum",
        expected=(f"md5 {OMNIGLOT_UPSTREAM_MD5.get(name)} (the zip published at github.com/brendenlake/omniglot) "
                  f"or sha256 {expected} (a deterministic re-zip of its images)"),
        found=f"sha256 {sha256}, md5 {md5}", how_to_get=_HOW_TO_GET)


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


def _usable(image_size: int) -> Any:
    """Whether cached arrays are those of a decoded zip at ``image_size``."""
    def check(arrays: Any) -> bool:
        images, names = arrays["images"], arrays["characters"]
        return bool(images.dtype == np.uint8 and images.ndim == 4 and images.shape[2:] == (image_size, image_size)
                    and names.ndim == 1 and names.shape[0] == images.shape[0])
    return check


class _Decoded(NamedTuple):
    sha256: str
    md5: str
    images: np.ndarray
    characters: tuple[str, ...]


# In-process copies, keyed by (file identity, image size): a second read of an unchanged file
# neither hashes nor decodes it again.
_memory = Memo()


def _clear_cache() -> None:
    """Forget the in-process copies (for tests and long-lived processes); disk caches stay."""
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
        verify: check the file against :data:`OMNIGLOT_UPSTREAM_MD5` (the published zip) or
            :data:`OMNIGLOT_SHA256`; the file must then have one of the official names.
        cache_dir: where the decoded array is cached (a ``.npz`` named after the zip's sha256,
            so a changed zip never reads a stale cache); None means
            :func:`l2o.cache.default_cache_dir`, False disables the disk cache. An unwritable
            cache only warns.
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
    key = (*file_key(path), size)
    hit = _memory.get(key)
    if hit is None:
        sha256, md5 = file_hashes(path, "sha256", "md5")
        if verify:
            _verify(path, sha256, md5)
        cache = resolve_cache_dir(cache_dir)
        file = _cache_file(cache, path, sha256, size) if cache is not None else None
        arrays = cached_arrays(file, lambda: _as_arrays(*_decode_zip(path, size)), names=("images", "characters"),
                               valid=_usable(size), what="Omniglot")
        hit = _Decoded(sha256, md5, arrays["images"], tuple(str(n) for n in arrays["characters"]))
        _memory.put(key, hit)
    elif verify:
        _verify(path, hit.sha256, hit.md5)
    return OmniglotData(torch.from_numpy(hit.images.copy()), hit.characters)


def _as_arrays(images: np.ndarray, characters: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {"images": images, "characters": np.array(characters, dtype=str)}


def _check_read_args(path: Any, verify: Any, cache_dir: Any) -> None:
    check_path("path", path)
    check_bool("verify", verify)
    check_cache_dir(cache_dir)


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
    paths = locate(resolve_data_dir(data_dir, (OMNIGLOT_SOURCE,)), OMNIGLOT_SOURCE, OMNIGLOT_FILES, what="Omniglot files")
    parts = [read_omniglot_zip(p, verify=verify, cache_dir=cache_dir, image_size=image_size) for p in paths]
    if parts[0].images.shape[1:] != parts[1].images.shape[1:]:
        raise DataError(
            f"{paths[0]} and {paths[1]} disagree: drawings of shape {tuple(parts[0].images.shape[1:])} "
            f"vs {tuple(parts[1].images.shape[1:])}; expected 20 drawings per character in both"
        )
    return OmniglotData(torch.cat([p.images for p in parts]), parts[0].characters + parts[1].characters)
