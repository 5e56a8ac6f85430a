"""Where an evaluation record's image lives, refusing paths that leave the image root.

`image_path(root, image)` is the only way the runner and the report turn a record's image path into a
file: an absolute path, a drive, a `..` part (POSIX or Windows spelling), or a symlink anywhere along the
way that leads outside the root raises `PathEscapeError` (a ValueError), which the runner records as that
record's image failure, like a missing or corrupt image. (`vistune.data.validate.escapes_root` reads only
the path text; this also resolves links.)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

PATH_ESCAPE = "path escapes image root"
_SEPARATORS = re.compile(r"[\\/]")


class PathEscapeError(ValueError):
    """An image path that leads outside the image root; the message names the path and the root."""


def escapes_by_text(image: str) -> bool:
    """True for absolute paths, drive letters (`C:`) or '..' parts, in POSIX or Windows spelling (as
    `vistune.data.validate.escapes_root`, written with string operations: this runs once per image)."""
    return image.startswith(("/", "\\")) or image[1:2] == ":" or ".." in _SEPARATORS.split(image)


def image_path(image_root: str | Path | None, image: str) -> Path:
    """`image_root / image` (root default: the current folder), or PathEscapeError when that path is not
    inside the root: by its text, or once symlinks are resolved (a link to /etc/passwd, or a linked
    folder pointing elsewhere). A root that is itself a symlink is fine: the root is resolved too."""
    root = os.fspath(image_root or ".")
    if not isinstance(image, str) or not image:
        raise PathEscapeError(f"image path must be a non-empty string, got {image!r}")
    if escapes_by_text(image):
        raise PathEscapeError(f"{image!r}: {PATH_ESCAPE} {root!r} (absolute or '..')")
    path = os.path.join(root, image)
    try:
        real_root, real = os.path.realpath(root), os.path.realpath(path)
    except (OSError, ValueError) as e:  # e.g. an embedded NUL byte
        raise PathEscapeError(f"{path}: cannot resolve the path: {e}") from e
    if not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise PathEscapeError(f"{image!r}: {PATH_ESCAPE} {root!r} through a symlink (to {real})")
    return Path(path)
