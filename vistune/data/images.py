"""Open images safely: `load_image` returns RGB whatever the file holds; `check_image` is the fast probe.

Handles RGBA/LA/palette transparency (composited on white), grayscale, CMYK, 16-bit and float modes, EXIF
orientation and animated files (first frame). The pixel limit is ours (`max_pixels`), not Pillow's
global MAX_IMAGE_PIXELS, so a dataset of large scans can raise it and a server can lower it. Every
failure is an `ImageError` naming the path, with `kind` one of IMAGE_PROBLEMS.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 2**20  # about 8192 x 8192
IMAGE_PROBLEMS = (
    "missing image",
    "zero-byte image",
    "unreadable image",
    "truncated image",
    "too-large image",
)
_PILLOW_GUARD = threading.Lock()


class ImageError(ValueError):
    """An image that cannot be used; `kind` is one of IMAGE_PROBLEMS, the message names the path."""

    def __init__(self, path: str | Path, kind: str, detail: str):
        super().__init__(f"{path}: {kind}: {detail}")
        self.path, self.kind, self.detail = str(path), kind, detail


@contextmanager
def _our_limit_only():
    """Switch off Pillow's own decompression-bomb check while opening; we apply max_pixels instead."""
    with _PILLOW_GUARD:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open(path: Path, max_pixels: int) -> Image.Image:
    """Open (header only) and check existence, emptiness, format and pixel count."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "missing image", "no such file") from None
    except OSError as e:
        raise ImageError(path, "unreadable image", e.strerror or str(e)) from e
    if size == 0:
        raise ImageError(path, "zero-byte image", "the file is empty")
    try:
        with _our_limit_only():
            im = Image.open(path)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, "unreadable image", f"not an image Pillow can identify ({e})") from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(
            path, "too-large image", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}"
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
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


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Load an image as RGB (first frame, EXIF orientation applied), refusing more than max_pixels.

    Raises ImageError (missing, zero-byte, unreadable, truncated, too-large) naming the path.
    """
    path = Path(path)
    im = _open(path, max_pixels)
    try:
        with im:
            im.seek(0)  # animated GIF/PNG/WebP: the first frame
            im.load()
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(path, "truncated image", f"could not decode the pixel data ({e})") from e


def check_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Fast probe for validation: open the header, check the size, detect truncation; return (w, h).

    PNG: verify() walks the chunks and their CRCs without inflating. JPEG: a file ending in the EOI
    marker is taken as complete; otherwise it is decoded to tell a truncated file from trailing bytes.
    Other formats are decoded fully.
    """
    path = Path(path)
    im = _open(path, max_pixels)
    with im:
        size, fmt = im.size, im.format
        try:
            if fmt == "PNG":
                im.verify()
            elif fmt != "JPEG" or not _ends_with_eoi(path):
                im.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageError(path, "truncated image", f"{fmt} data is incomplete or corrupt ({e})") from e
    return size


def _ends_with_eoi(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - 64))
        return f.read().rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
