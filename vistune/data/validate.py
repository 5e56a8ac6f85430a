"""Check a dataset before training: every record's structure, text and images, reported by kind.

`validate(path, image_root)` reads a file with `load_records`, checks each record with the one check
training uses too (`RecordCheck`: the record reads, its id is unique in the file, `check_record`), and
returns a `Report` (problems grouped by kind with record ids). Training selects its records through the
same check (`select_checked`), so validation passes exactly the records training accepts; `ensure_valid`
is the per-record gate: raise a DataError naming the file and record, or skip and count.
Every image is decoded in full as training loads it (`images.check_image`: `load_image` plus a check
that a PNG's pixel data is complete), so what passes validation trains. Each image file is decoded once
per run however many records share it (a `cache` dict). An image path must stay inside the image root
both as written (no absolute path, no '..') and once resolved (no symlink leading out); one that does
not is never opened.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from vistune.config import DataSpec
from vistune.data.images import DEFAULT_MAX_PIXELS, ImageError, check_image
from vistune.data.readers import DataError, RecordSet, load_records
from vistune.data.records import IMAGE_PLACEHOLDER, ROLES, Record

PROBLEM_KINDS = (
    "bad file",
    "bad json",
    "bad record",
    "duplicate id",
    "missing image",
    "unreadable image",
    "truncated image",
    "zero-byte image",
    "too-large image",
    "placeholder mismatch",
    "bad role",
    "empty turn",
    "non-UTF-8 text",
    "path escapes root",
)
ON_BAD = ("raise", "skip")


@dataclass(frozen=True)
class Problem:
    """One thing wrong: its kind (one of PROBLEM_KINDS), the record id (None: the whole file), details."""

    kind: str
    record: str | None
    detail: str


def _has_surrogates(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _role_problems(record: Record) -> list[str]:
    """Unknown roles, system turns after the first, not starting with user, not alternating, not ending
    with the assistant's answer (what training learns from); the rules of `template.render`."""
    out = [f"turn {i}: unknown role {t.role!r}" for i, t in enumerate(record.turns) if t.role not in ROLES]
    if out:
        return out
    roles = [t.role for t in record.turns]
    if "system" in roles[1:]:
        out.append(f"turn {roles.index('system', 1)}: a system turn may only come first")
    body = roles[1:] if roles[:1] == ["system"] else roles
    if not body or body[0] != "user":
        out.append("the conversation must start with a user turn (after an optional system turn)")
    for i, (a, b) in enumerate(zip(body[:-1], body[1:], strict=True)):
        if a == b and a != "system":
            out.append(f"two {a} turns in a row (turn {i + 1 + (len(roles) - len(body))})")
            break
    if body and body[-1] != "assistant" and not out:
        out.append("the conversation must end with an assistant turn (the answer trained on)")
    return out


def _placeholder_problem(record: Record, roles_ok: bool) -> str | None:
    """One `<image>` placeholder per image, each in a user turn (where training expands them)."""
    total = sum(t.content.count(IMAGE_PLACEHOLDER) for t in record.turns)
    if total != len(record.images):
        return f"{total} {IMAGE_PLACEHOLDER} placeholder(s) for {len(record.images)} image(s)"
    if roles_ok and record.images:
        for i, turn in enumerate(record.turns):
            if turn.role != "user" and IMAGE_PLACEHOLDER in turn.content:
                return f"turn {i} ({turn.role}) holds an {IMAGE_PLACEHOLDER}; images go in user turns"
    return None


def escapes_root(image: str, image_root: str | Path | None = None) -> bool:
    """True for absolute paths or paths with '..' parts (POSIX or Windows spelling); with `image_root`,
    also for a path that resolves (through symlinks) to a place outside the resolved root."""
    posix, win = PurePosixPath(image), PureWindowsPath(image)
    if (
        posix.is_absolute()
        or win.is_absolute()
        or bool(win.drive)
        or ".." in posix.parts
        or ".." in win.parts
    ):
        return True
    return image_root is not None and resolved_outside(image, Path(image_root), {}) is not None


def resolved_outside(image: str, image_root: Path, cache: dict | None = None) -> str | None:
    """None when root/image resolves inside the resolved root; else a detail saying where it leads.

    A symlink loop resolves to itself here; opening it then fails as an unreadable image.
    """
    cache = {} if cache is None else cache
    key = ("resolved root", image_root)
    if key not in cache:
        cache[key] = os.path.realpath(image_root)
    root = cache[key]
    target = os.path.realpath(os.path.join(image_root, image))
    if target == root or target.startswith(os.path.join(root, "")):
        return None
    return f"{image!r} resolves to {target!r}, outside the image root {root!r}"


def _probe(path: Path, max_pixels: int) -> tuple[str, str] | None:
    try:
        check_image(path, max_pixels)
    except ImageError as e:
        return e.kind, str(e)
    return None


def _location_problem(image: str, image_root: Path, cache: dict) -> str | None:
    """Why an image path may not be opened (escapes the root as written or resolved), or None."""
    key = ("location", image_root, image)
    if key not in cache:
        if escapes_root(image):
            cache[key] = f"{image!r} is not inside the image root"
        else:
            cache[key] = resolved_outside(image, image_root, cache)
    return cache[key]


def _image_problems(record: Record, image_root: Path, max_pixels: int, cache: dict) -> list[Problem]:
    problems = []
    for image in record.images:
        where = _location_problem(image, image_root, cache)
        if where is not None:
            problems.append(Problem("path escapes root", record.id, where))
            continue
        path = image_root / image
        if path not in cache:
            cache[path] = _probe(path, max_pixels)
        if cache[path] is not None:
            problems.append(Problem(cache[path][0], record.id, cache[path][1]))
    return problems


def check_record(
    record: Record,
    image_root: str | Path,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    cache: dict | None = None,
) -> list[Problem]:
    """Every problem of one record: roles, empty turns, text encoding, placeholders, image paths and files.

    Args:
        record: the record to check.
        image_root: the folder its image paths are relative to.
        max_pixels: images with more pixels are 'too-large image'.
        check_images: also decode each image file in full (as training loads it).
        cache: optional dict shared across calls so each image is decoded (and resolved) once.
    """
    rid = record.id
    roles = _role_problems(record)
    problems = [Problem("bad role", rid, d) for d in roles]
    problems += [
        Problem("empty turn", rid, f"turn {i} ({t.role}) has no text")
        for i, t in enumerate(record.turns)
        if not t.content.strip()
    ]
    texts = [rid, *record.images, *(t.content for t in record.turns)]
    if any(_has_surrogates(t) for t in texts):
        problems.append(Problem("non-UTF-8 text", rid, "a string holds bytes that are not UTF-8"))
    placeholders = _placeholder_problem(record, not roles)
    if placeholders:
        problems.append(Problem("placeholder mismatch", rid, placeholders))
    if check_images:
        problems += _image_problems(record, Path(image_root), max_pixels, {} if cache is None else cache)
    return problems


def ensure_valid(
    record: Record,
    image_root: str | Path,
    on_bad: str = "raise",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    check_images: bool = True,
    cache: dict | None = None,
) -> bool:
    """Gate one record for training: True if valid; else raise DataError (on_bad='raise') or return False.

    With on_bad='skip' the caller counts the False results and reports them; nothing is dropped silently.
    Images are decoded as training loads them, so a record whose image training could not load is
    caught here, before training starts. Pass one `cache` dict for all records of a run.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    problems = check_record(record, image_root, max_pixels, check_images, cache)
    if not problems:
        return True
    if on_bad == "skip":
        return False
    raise _refuse(problems, record)


class RecordCheck:
    """The one check a record of a file passes before training, shared by `validate` and training.

    `read(i)`: record `i` reads (a DataError is a problem) and its id is not one an earlier record of the
    file has; `check(record)`: `check_record`. Call `read` in file order (duplicates are found in order).
    """

    def __init__(
        self, records: RecordSet, max_pixels: int = DEFAULT_MAX_PIXELS, cache: dict | None = None
    ) -> None:
        self.records, self.max_pixels = records, max_pixels
        self.cache = {} if cache is None else cache
        self._first: dict[str, int] = {}  # explicit id -> index of its first record

    def read(self, index: int) -> tuple[Record | None, list[Problem]]:
        """Record `index` (None if it does not read) and the problems found reading it."""
        try:
            record = self.records[index]
        except DataError as e:
            return None, [Problem(e.kind, e.record or f"#{index}", str(e))]
        raw = self.records.raw(index)
        if isinstance(raw, dict) and "id" in raw:
            first = self._first.setdefault(record.id, index)
            if first != index:
                detail = f"field 'id': record #{first} has the same id; ids must be unique"
                return record, [Problem("duplicate id", record.id, detail)]
        return record, []

    def check(self, record: Record) -> list[Problem]:
        """`check_record` with this file's image root, pixel cap and decode cache."""
        return check_record(record, self.records.image_root, self.max_pixels, cache=self.cache)

    def __call__(self, index: int) -> tuple[Record | None, list[Problem]]:
        record, problems = self.read(index)
        return record, problems or (self.check(record) if record is not None else [])


def _refuse(problems: list[Problem], record: Record | None) -> DataError:
    """One DataError naming the file and record (a record that did not read: its reader's message)."""
    if record is None:
        message = "; ".join(p.detail for p in problems)
    else:
        message = f"{record.where()}: " + "; ".join(f"{p.kind}: {p.detail}" for p in problems)
    return DataError(message, kind=problems[0].kind, record=problems[0].record)


def select_checked(
    spec: DataSpec, on_bad: str = "raise", cache: dict | None = None
) -> tuple[list[Record], int]:
    """The records of one dataset that a stage trains on, each through the check `validate` makes.

    Those `spec.where` keeps, the first `spec.limit` good ones, each `spec.repeat` times (the copies
    follow the originals). A bad record raises a DataError naming the file and record (on_bad='raise')
    or is skipped; returns (records, skipped). A `where` that keeps nothing is an error naming it.
    """
    if on_bad not in ON_BAD:
        raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
    records = load_records(spec.path, spec.image_root)  # lazy: each record parsed once, when reached
    check = RecordCheck(records, cache=cache)
    kept: list[Record] = []
    skipped = 0
    for index in range(len(records)):
        if spec.limit and len(kept) >= spec.limit:
            break
        record, problems = check.read(index)
        if not problems:
            if not spec.selects(record.meta):
                continue
            problems = check.check(record)
        if problems and on_bad == "raise":
            raise _refuse(problems, record)
        skipped += bool(problems)
        kept += [] if problems else [record]
    if spec.where and not kept and not skipped:
        raise ValueError(f"{spec.path}: no record matches where={spec.where} (fields: records' extra keys)")
    return kept * spec.repeat, skipped


@dataclass
class Report:
    """The result of validating one file."""

    path: str
    image_root: str
    records: int = 0
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def by_kind(self) -> dict[str, list[Problem]]:
        """Problems grouped by kind, in PROBLEM_KINDS order."""
        groups: dict[str, list[Problem]] = {}
        for p in sorted(
            self.problems, key=lambda p: PROBLEM_KINDS.index(p.kind) if p.kind in PROBLEM_KINDS else 99
        ):
            groups.setdefault(p.kind, []).append(p)
        return groups

    def format(self, show: int = 5) -> str:
        """A readable report: totals, then per kind the count, record ids and the first details."""
        bad = len({p.record for p in self.problems})
        lines = [
            f"{self.path} (images under {self.image_root}): {self.records} records checked in "
            f"{self.seconds:.2f} s, {len(self.problems)} problem(s) in {bad} record(s)"
        ]
        for kind, items in self.by_kind().items():
            ids = [str(p.record) for p in items if p.record is not None]
            more = f" ... and {len(ids) - 20} more" if len(ids) > 20 else ""
            lines.append(f"  {kind} ({len(items)}): {', '.join(ids[:20])}{more}")
            lines += [f"    - {p.detail}" for p in items[:show]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


def validate(
    path: str | Path, image_root: str | Path | None = None, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Report:
    """Check every record of a file (or ImageFolder); file-level problems are reported with record None."""
    start = time.perf_counter()
    try:
        records = load_records(path, image_root)
    except DataError as e:
        return Report(str(path), str(image_root), 0, [Problem(e.kind, None, str(e))])
    report = Report(str(path), str(records.image_root), len(records))
    if not records:  # nothing to train on is not a dataset that passes
        report.problems.append(Problem("bad file", None, f"{path}: no records"))
    check = RecordCheck(records, max_pixels)
    for i in range(len(records)):
        report.problems += check(i)[1]
    report.seconds = time.perf_counter() - start
    return report


def _count(text: str) -> int:
    """argparse type: a whole number, 0 or more."""
    if not text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number, 0 or more, got {text!r}")
    return int(text)


def main_validate(argv: list[str] | None = None) -> int:
    """`vistune data validate`: check a dataset file; exit 1 when any problem is found."""
    p = argparse.ArgumentParser(prog="vistune data validate", description=main_validate.__doc__)
    p.add_argument("file", help="LLaVA .json/.jsonl, pairs .jsonl, or an ImageFolder directory")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help=f"largest image allowed, in pixels (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument("--show", type=_count, default=5, help="details shown per problem kind (0 or more)")
    args = p.parse_args(argv)
    report = validate(args.file, args.image_root, args.max_pixels)
    print(report.format(args.show))
    if report.records and report.seconds:
        print(f"{report.records / report.seconds:.0f} records/s")
    return 0 if report.ok else 1
