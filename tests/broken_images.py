"""Images whose headers and chunk structure are fine but whose pixel data is not, for validation tests.

- `cut_stream_png`: every chunk and CRC valid, the IDAT zlib stream cut in half (Pillow's decoder fails).
- `short_png`: every chunk and CRC valid, a complete zlib stream holding only the first rows (Pillow pads
  the rest with zeros without a word); `interlaced=True` writes it Adam7-interlaced.
- `progressive_jpeg_cuts`: a progressive JPEG cut at many points, each with the EOI marker appended.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(raw: bytes, size: int = 64, interlaced: bool = False) -> bytes:
    """An 8-bit RGB PNG of side `size` whose IDAT holds `raw` (filter bytes included), CRCs all valid."""
    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, int(interlaced))
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw))
        + _chunk(b"IEND", b"")
    )


def raw_rows(size: int = 64, interlaced: bool = False, seed: int = 0) -> bytes:
    """The complete filtered pixel data of a noisy size x size RGB image (filter 0 on every row)."""
    rng = np.random.default_rng(seed)
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    out = b""
    for x0, y0, dx, dy in passes:
        cols, rows = (size - x0 + dx - 1) // dx, (size - y0 + dy - 1) // dy
        if cols > 0:
            out += b"".join(
                b"\x00" + rng.integers(0, 256, cols * 3, dtype=np.uint8).tobytes() for _ in range(rows)
            )
    return out


def short_png(path: Path, interlaced: bool = False) -> Path:
    """Valid chunks, a complete zlib stream, but a quarter of the pixel data missing."""
    raw = raw_rows(interlaced=interlaced)
    path.write_bytes(png_bytes(raw[: len(raw) * 3 // 4], interlaced=interlaced))
    return path


def cut_stream_png(path: Path) -> Path:
    """Valid chunks and CRCs, but the IDAT holds only the first half of the zlib stream."""
    whole = png_bytes(raw_rows())
    stream = zlib.compress(raw_rows())
    idat_at = whole.index(b"IDAT") - 4
    header = whole[:idat_at]
    path.write_bytes(header + _chunk(b"IDAT", stream[: len(stream) // 2]) + _chunk(b"IEND", b""))
    return path


def progressive_jpeg_cuts(folder: Path) -> list[Path]:
    """A noisy progressive JPEG cut every ~70 bytes, each cut ending with the EOI marker."""
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, "JPEG", quality=90, progressive=True)
    data = buf.getvalue()
    paths = []
    for cut in range(400, len(data) - 2, 66):
        path = folder / f"cut{cut}.jpg"
        path.write_bytes(data[:cut] + b"\xff\xd9")
        paths.append(path)
    return paths
