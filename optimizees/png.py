"""A small PNG reader for grayscale, non-interlaced images (what Omniglot's drawings are).

:func:`decode_png` parses the chunks (checking every CRC, skipping ancillary chunks), inflates the
``IDAT`` stream with :mod:`zlib`, undoes the five scanline filters (None, Sub, Up, Average,
Paeth; PNG specification §9) and unpacks bit depths 1, 2, 4 and 8 to uint8 gray levels
``v * 255 // (2**depth - 1)``. No PIL or torchvision needed. Anything else (colour, 16-bit,
interlaced, a damaged file) is refused with a :class:`~optimizees.datafiles.DataError` naming
the problem.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from .datafiles import DataError

__all__ = ["decode_png"]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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
