"""Where a dataset writer (`vistune data synth`, `vistune data digits`) writes: a new or empty directory,
or its own previous output, replaced whole.

The dataset is built in a hidden folder beside `out` and renamed into place when complete, so a
half-written dataset never sits at `out`; anything that is not a previous output is refused, so stale
files never mix with new ones. A writer says what it owns with an `OutputKind`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OutputKind:
    """What one writer's output is: its name, the command that writes it, the top-level names it
    writes, and how its manifest.json is recognised."""

    name: str  # e.g. "shapes-world dataset"
    command: str  # e.g. "vistune data synth"
    owned: frozenset[str]
    is_manifest: Callable[[dict], bool]


def check_out(out: Path, kind: OutputKind) -> bool:
    """Whether `out` holds a previous output (to replace); raise ValueError if it may not be written.

    Writable: a missing path, an empty directory, or a directory holding `kind`'s manifest and
    nothing but what `kind` writes.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a directory; give --out a new or empty directory")
    try:
        if not out.exists() or not any(out.iterdir()):
            return False
    except OSError as e:
        raise ValueError(f"{out}: cannot read the directory ({e.strerror or e})") from e
    if not _is_manifest(out / "manifest.json", kind):
        raise ValueError(
            f"{out}: the directory is not empty and is not a {kind.name} (no manifest.json written "
            f"by `{kind.command}`); give --out a new or empty directory"
        )
    foreign = sorted(p.name for p in out.iterdir() if p.name not in kind.owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ValueError(
            f"{out}: a previous {kind.name}, but it also holds {shown}, which `{kind.command}` did not "
            "write and would delete when replacing it; move them away or give --out another directory"
        )
    return True


def _is_manifest(path: Path, kind: OutputKind) -> bool:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and kind.is_manifest(data)


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
