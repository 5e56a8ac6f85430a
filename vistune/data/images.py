"""Open images safely: `load_image` returns RGB whatever the file holds; `check_image` decodes the same way.

Handles RGBA/LA/palette transparency (composited on white), grayscale, CMYK, 16-bit and float modes, EXIF
orientation and animated files (first frame). The pixel limit is ours (`max_pixels`), checked from the
header before any pixel data is decoded; Pillow's global MAX_IMAGE_PIXELS is never changed (`open_header`
identifies a file without Pillow's check, so another thread's `Image.open` keeps Pillow's protection).
A dataset of large scans can raise `max_pixels` and a server can lower it. Every failure is an
`ImageError` naming the path, with `kind` one of IMAGE_PROBLEMS.
"""

from __future__ import annotations

import functools
import stat
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 2**20  # about 8192 x 8192
IMAGE_PROBLEMS = (
    "missing image",
    "zero-byte image",
    "unreadable image",
    "truncated image",
    "too-large image",
)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, zlib.error)
_REDUCIBLE = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK", "I", "F")  # modes Image.reduce takes


class ImageError(ValueError):
    """An image that cannot be used; `kind` is one of IMAGE_PROBLEMS, the message names the path."""

    def __init__(self, path: str | Path, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.path, self.kind, self.detail = str(path), kind, detail


def _try_formats(fp: BinaryIO, prefix: bytes, formats: Sequence[str]) -> ImageFile.ImageFile | None:
    """The first of `formats` whose plugin accepts the file, opened (header only); None if none does."""
    for name in formats:
        entry = Image.OPEN.get(name.upper())
        if entry is None:
            continue
        factory, accept = entry
        result = not accept or accept(prefix)
        if not result or isinstance(result, str):  # a str is Pillow's "almost, but no" message
            continue
        fp.seek(0)
        try:
            return factory(fp, name if isinstance(name := getattr(fp, "name", ""), str) else "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue
    return None


def open_header(fp: BinaryIO, formats: Sequence[str] | None = None) -> ImageFile.ImageFile:
    """`Image.open` for a binary file object, without Pillow's global decompression-bomb check.

    Only the header is read: check `im.size` against your own limit before `load()`. Pillow's
    MAX_IMAGE_PIXELS is neither read here nor changed, so other threads keep Pillow's protection (and a
    limit raised above Pillow's is honoured). The caller owns `fp` (closing the image leaves it open).
    `formats` restricts the plugins tried, as in `Image.open`. Raises UnidentifiedImageError.
    """
    fp.seek(0)
    prefix = fp.read(16)
    Image.preinit()  # BMP, GIF, JPEG, PPM, PNG
    if formats is not None and any(f.upper() not in Image.OPEN for f in formats):
        Image.init()  # every other plugin
    tried = list(Image.ID)
    im = _try_formats(fp, prefix, formats if formats is not None else tried)
    if im is None and formats is None:
        Image.init()  # every other plugin
        im = _try_formats(fp, prefix, [f for f in Image.ID if f not in tried])
    if im is None:
        raise UnidentifiedImageError("cannot identify image file")
    return im


_PATTERN = bytes((i * 37 + 11) % 256 for i in range(251))  # a prime length: rows do not repeat it evenly
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def _png_data_bytes(width: int, height: int, bits: int, interlaced: bool) -> int:
    """Bytes the inflated IDAT stream must hold: one filter byte plus the packed samples per row."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    total = 0
    for x0, y0, dx, dy in passes:
        cols, rows = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if cols > 0 and rows > 0:
            total += rows * (1 + (cols * bits + 7) // 8)
    return total


def _png_short_by(fp: BinaryIO) -> int:
    """How many bytes of pixel data a PNG's IDAT stream lacks (0: complete).

    Pillow pads a PNG whose zlib stream ends cleanly before the last row with zeros and says nothing;
    this reads the chunks again and inflates the IDAT data to count what is there.
    """
    fp.seek(8)
    ihdr, stream, have, in_idat = None, zlib.decompressobj(), 0, False
    while True:
        head = fp.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        body = fp.read(length)
        fp.read(4)  # CRC (Pillow checked it)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            have += len(stream.decompress(body))
            in_idat = True
        elif in_idat or kind == b"IEND":  # the IDAT chunks are consecutive
            break
    if ihdr is None:
        return 0
    w, h, depth, colour, _, _, interlace = ihdr
    need = _png_data_bytes(w, h, depth * _PNG_CHANNELS.get(colour, 1), bool(interlace))
    have += len(stream.flush())
    return max(0, need - have)


def _mark_last_row(im: ImageFile.ImageFile) -> bytes | None:
    """Paint a pattern into the last row of a PNG's pixel buffer before decoding; return the pattern.

    The decoder writes whole rows top to bottom, so a last row that still holds the pattern afterwards
    means the data may have ended early (then `_png_short_by` counts exactly); any other last row means
    every row was decoded, at no cost. None where this cannot tell (interlaced or animated PNGs).
    """
    if im.info.get("interlace") or getattr(im, "n_frames", 1) > 1:
        return None
    try:
        im.load_prepare()  # allocates the buffer that load() then decodes into
        w, h = im.size
        marker, pattern = _row_marker(im.mode, w)
        im.im.paste(marker.im, (0, h - 1, w, h))
        return pattern
    except (ValueError, TypeError, AttributeError):
        return None


@functools.lru_cache(maxsize=64)
def _row_marker(mode: str, width: int) -> tuple[Image.Image, bytes]:
    """A one-row image of `mode` holding an irregular byte pattern, and its bytes."""
    size = len(Image.new(mode, (width, 1)).tobytes())
    pattern = (_PATTERN * (size // len(_PATTERN) + 1))[:size]
    marker = Image.frombytes(mode, (width, 1), pattern)
    return marker, marker.tobytes()


def _png_incomplete(im: ImageFile.ImageFile, fp: BinaryIO, marker: bytes | None) -> int:
    """Bytes of pixel data a decoded PNG lacks (0: complete); see `_mark_last_row`."""
    w, h = im.size
    if marker is not None and im.crop((0, h - 1, w, h)).tobytes() != marker:
        return 0
    return _png_short_by(fp)


def _check_file(path: Path) -> None:
    """Missing, zero-byte and not regular files, before Pillow sees them."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise ImageError(path, "missing image", "no such file") from None
    except OSError as e:
        raise ImageError(path, "unreadable image", e.strerror or str(e)) from e
    if not stat.S_ISREG(info.st_mode):  # opening a FIFO blocks until a writer comes
        raise ImageError(path, "unreadable image", "not a regular file (a FIFO, device or socket)")
    if info.st_size == 0:
        raise ImageError(path, "zero-byte image", "the file is empty")


def _header(fp: BinaryIO, path: Path, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the format and check the pixel count from the header; nothing is decoded yet."""
    try:
        im = open_header(fp)
    except (UnidentifiedImageError, *_DECODE_ERRORS) as e:
        raise ImageError(path, "unreadable image", f"not an image Pillow can identify ({e})") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(
            path, "too-large image", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to 8-bit RGB; transparency is composited on white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if im.mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0  # 16-bit range -> 8-bit
        im = Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _decode(
    im: ImageFile.ImageFile, fp: BinaryIO, path: Path, whole_png: bool, min_side: int | None = None
) -> Image.Image:
    """Decode the first frame in full (with `whole_png`, check a PNG's data is complete), orient, to RGB;
    with `min_side`, downscaled by a whole factor to no less than `min_side` on its shorter side."""
    try:
        im.seek(0)  # animated GIF/PNG/WebP: the first frame
        whole_png = whole_png and im.format == "PNG"
        marker = _mark_last_row(im) if whole_png else None
        if min_side and im.format == "JPEG":
            im.draft(im.mode, (min_side, min_side))  # decoded at 1/2, 1/4 or 1/8 scale where that is enough
        im.load()
        short = _png_incomplete(im, fp, marker) if whole_png else 0
        if not short:
            factor = min(im.size) // min_side if min_side else 1
            if factor < 2 or im.mode not in _REDUCIBLE:
                ImageOps.exif_transpose(im, in_place=True)
                return to_rgb(im)
            return to_rgb(ImageOps.exif_transpose(im.reduce(factor)))  # the full-size pixels go at once
    except Image.DecompressionBombError as e:  # Pillow's own check inside a decoder (TIFF, GIF frames)
        raise ImageError(path, "too-large image", f"refused by Pillow's MAX_IMAGE_PIXELS ({e})") from e
    except _DECODE_ERRORS as e:
        raise ImageError(path, "truncated image", f"could not decode the pixel data ({e})") from e
    raise ImageError(path, "truncated image", f"the PNG pixel data ends {short} bytes early")


def _load(path: str | Path, max_pixels: int, whole_png: bool) -> Image.Image:
    path = Path(path)
    _check_file(path)
    try:
        fp = open(path, "rb")
    except OSError as e:
        raise ImageError(path, "unreadable image", e.strerror or str(e)) from e
    with fp:
        im = _header(fp, path, max_pixels)
        with im:
            return _decode(im, fp, path, whole_png)


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as RGB (first frame, EXIF orientation applied), refusing more than max_pixels.

    The pixel count is checked from the header before anything is decoded. Raises ImageError (missing,
    zero-byte, unreadable, truncated, too-large) naming the path.
    """
    return _load(path, max_pixels, whole_png=False)


def decode_opened(
    im: ImageFile.ImageFile, fp: BinaryIO, label: str, min_side: int | None = None
) -> Image.Image:
    """Decode an image `open_header` opened from `fp` as `check_image` checks it (a PNG must hold every
    row), oriented, RGB; `min_side`: downscaled by a whole factor to no less than that on its shorter side
    (JPEGs decoded at that scale). Raises ImageError naming `label`; closes `im`."""
    with im:
        return _decode(im, fp, Path(label), whole_png=True, min_side=min_side)


def check_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Validation's check: decode as `load_image` (which training calls) does; return the loaded (w, h).

    The same header check, pixel cap, full decode, first frame, EXIF orientation and RGB conversion, so
    what passes here loads in training. One check more: a PNG whose zlib stream ends cleanly before the
    last row, which Pillow (and so `load_image`) pads with zeros without a word, is a truncated image
    here (found at no cost for plain PNGs, by inflating the data again for interlaced or animated ones).
    """
    return _load(path, max_pixels, whole_png=True).size
