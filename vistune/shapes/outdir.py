"""Where `vistune data synth` writes: a new or empty directory, or its own previous output, replaced whole.

The dataset is built in a hidden folder beside `out` and renamed into place when complete, so a
half-written dataset never sits at `out`; anything that is not a previous output is refused, so stale
files never mix with new ones.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from vistune.shapes.scenes import SPLITS

OWNED = frozenset({"manifest.json", "scenes", "images", "imagefolder", *SPLITS})  # what synth writes


def check_out(out: Path) -> bool:
    """Whether `out` holds a previous output (to replace); raise ValueError if it may not be written.

    Writable: a missing path, an empty directory, or a directory holding a shapes-world manifest and
    nothing but what `synthesize` writes (OWNED).
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; give --out a new or empty directory")
    try:
        if not out.exists() or not any(out.iterdir()):
            return False
    except OSError as e:
        raise ValueError(f"{out}: cannot read the directory ({e.strerror or e})") from e
    if not is_manifest(out / "manifest.json"):
        raise ValueError(
            f"{out}: the directory is not empty and is not a shapes-world dataset (no manifest.json written "
            "by `vistune data synth`); give --out a new or empty directory"
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OWNED)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out}: a previous shapes-world dataset, but it also holds {shown}, which synth did not "
            "write and would delete when replacing it; move them away or give --out another directory"
        )
    return True


def is_manifest(path: Path) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"seed", "sizes", "counts", "held_out"} <= set(data)


def staging_dir(out: Path) -> Path:
    """A new hidden folder beside `out` (same filesystem, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise ValueError(f"{out}: cannot create the output directory ({e.strerror or e})") from e
    return tmp


def move_into_place(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished dataset to `out`; a previous output is moved aside first, then deleted."""
    old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        if replace:
            os.rename(out, old)
        try:
            os.replace(tmp, out)  # over a missing path or an empty directory
        except OSError:
            if replace:
                os.rename(old, out)  # put the previous output back
            raise
    except OSError as e:
        raise ValueError(
            f"{out}: cannot move the finished dataset into place ({e.strerror or e}); a mount point or "
            "a directory another process holds cannot be replaced: give --out a folder inside it"
        ) from e
    if replace:
        shutil.rmtree(old, ignore_errors=True)
