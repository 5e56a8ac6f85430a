"""Where an evaluation record's image lives, refusing paths that leave the image root.

`image_path(root, image)` is the only way the runner and the report turn a record's image path into a
file: an absolute path, a drive, a `..` part (POSIX or Windows spelling), or a symlink anywhere along the
way that leads outside the root raises `PathEscapeError` (a ValueError), which the runner records as that
record's image failure, like a missing or corrupt image. The checks are validation's
(`vistune.data.validate.escapes_root` and `resolved_outside`).
"""

from __future__ import annotations

from pathlib import Path

from vistune.data.validate import escapes_root, resolved_outside

PATH_ESCAPE = "path escapes image root"


class PathEscapeError(ValueError):
    """An image path that leads outside the image root; the message names the path and the root."""


def image_path(image_root: str | Path | None, image: str) -> Path:
    """`image_root / image` (root default: the current folder), or PathEscapeError when that path is not
    inside the root: by its text, or once symlinks are resolved (a link to /etc/passwd, or a linked
    folder pointing elsewhere). A root that is itself a symlink is fine: the root is resolved too."""
    root = Path(image_root or ".")
    if not isinstance(image, str) or not image:
        raise PathEscapeError(f"image path must be a non-empty string, got {image!r}")
    if escapes_root(image):
        raise PathEscapeError(f"{image!r}: {PATH_ESCAPE} {str(root)!r} (absolute or '..')")
    try:
        outside = resolved_outside(image, root)
    except (OSError, ValueError) as e:  # e.g. an embedded NUL byte
        raise PathEscapeError(f"{root / image}: cannot resolve the path: {e}") from e
    if outside is not None:
        raise PathEscapeError(f"{PATH_ESCAPE} through a symlink: {outside}")
    return root / image
