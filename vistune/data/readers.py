"""Read datasets into `Record`s: LLaVA JSON/JSONL, image-caption pair JSONL, ImageFolder.

`load_records(path)` returns a lazy `RecordSet`: the file is parsed once into raw dicts and each Record
is built (and checked) on indexing, so one bad record raises a `DataError` naming the file, the record
and the field when it is reached, and a caller can skip and count it. Images are never opened here.

Accepted record shapes (one file may mix them):
    {"id", "image"?: str | [str], "conversations": [{"from": human|gpt|system, "value"}, ...], ...extra}
    {"id", "image"?, "conversations": [{"role": user|assistant|system, "content"}, ...], ...extra}
    {"image", "caption", ...extra}   -> user "<image>", assistant caption; meta caption=...
Unknown extra fields go to Record.meta. A directory is read as ImageFolder (<dir>/<class>/<image>).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from itertools import islice
from pathlib import Path

from vistune.config import DataSpec
from vistune.data.records import IMAGE_PLACEHOLDER, ROLE_ALIASES, Record, Turn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_KNOWN = ("id", "image", "images", "conversations", "messages")


class DataError(ValueError):
    """A bad file or record; the message names the file, the record (id or index) and the field.

    `kind` says what is wrong in the words of `validate` (bad role, non-UTF-8 text, ...).
    """

    def __init__(self, message: str, kind: str = "bad record", record: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.record = record


class _BadLine:
    """A JSONL line that did not parse; indexing it raises."""

    def __init__(self, lineno: int, error: str):
        self.lineno, self.error = lineno, error


def _has_surrogates(text: str) -> bool:
    # Bytes that are not UTF-8 decode (errors="surrogateescape") to lone surrogates U+DC80..U+DCFF;
    # JSON \ud800-style escapes give lone surrogates too. Either cannot be encoded or tokenised.
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}", kind="bad file") from e
    return data.decode("utf-8", errors="surrogateescape")


def _parse(path: Path) -> list:
    """Raw items of a .json (a list) or .jsonl file; unparseable JSONL lines become _BadLine."""
    text = _read_text(path)
    if path.suffix == ".jsonl":
        items: list = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    items.append(_BadLine(lineno, e.msg))
                except RecursionError:  # json.loads recurses per nesting level
                    items.append(_BadLine(lineno, "nested too deeply to read"))
        return items
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", kind="bad file"
        ) from e
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read", kind="bad file") from None
    if not isinstance(data, list):
        raise DataError(
            f"{path}: expected a JSON list of records, got {type(data).__name__}", kind="bad file"
        )
    return data


class RecordSet(Sequence):
    """A lazy sequence of Records read from one file or folder.

    Attributes:
        path: the file or folder read.
        image_root: the folder image paths are relative to (default: the file's folder, or the
            ImageFolder itself).
        classes: class names of an ImageFolder, sorted; empty for files.
    """

    def __init__(self, path: Path, raw: list, image_root: Path, classes: list[str] | None = None):
        self.path, self._raw, self.image_root = path, raw, image_root
        self.classes = classes or []

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range ({len(self)} records)")
        return to_record(self._raw[index], str(self.path), index)

    def raw(self, index: int) -> dict:
        """The parsed dict of record `index`, as in the file."""
        return self._raw[index]


def _fail(source: str, rid: str, field: str, problem: str, kind: str = "bad record") -> DataError:
    return DataError(f"{source} record {rid!r}: field {field!r}: {problem}", kind=kind, record=rid)


def _images(item: dict, source: str, rid: str) -> list[str]:
    value = item.get("image", item.get("images"))
    if value is None:
        return []
    paths = [value] if isinstance(value, str) else value
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        raise _fail(source, rid, "image", f"expected a path or a list of paths, got {value!r}")
    return list(paths)


LLAVA_KEYS, OPENAI_KEYS = ("from", "value"), ("role", "content")


def _turn(message: object, source: str, rid: str, field: str) -> Turn:
    if not isinstance(message, dict):
        raise _fail(source, rid, field, f"expected an object, got {type(message).__name__}")
    llava, openai = [k for k in LLAVA_KEYS if k in message], [k for k in OPENAI_KEYS if k in message]
    if llava and openai:
        raise _fail(
            source, rid, field, f"mixes {llava} with {openai}: a turn is either from/value or role/content"
        )
    role_key, text_key = LLAVA_KEYS if llava else OPENAI_KEYS
    role, text = message.get(role_key), message.get(text_key)
    if role not in ROLE_ALIASES:
        raise _fail(
            source,
            rid,
            f"{field}.{role_key}",
            f"unknown role {role!r}; valid roles are {sorted(ROLE_ALIASES)}",
            kind="bad role",
        )
    if not isinstance(text, str):
        raise _fail(source, rid, f"{field}.{text_key}", f"expected a string, got {type(text).__name__}")
    if _has_surrogates(text):
        raise _fail(source, rid, f"{field}.{text_key}", "text is not valid UTF-8", kind="non-UTF-8 text")
    return Turn(ROLE_ALIASES[role], text)


def to_record(item: object, source: str, index: int) -> Record:
    """Build one Record from a raw parsed item (LLaVA conversation or image-caption pair)."""
    if isinstance(item, _BadLine):
        raise DataError(
            f"{source} line {item.lineno}: not valid JSON ({item.error})",
            kind="bad json",
            record=f"line {item.lineno}",
        )
    if not isinstance(item, dict):
        raise DataError(
            f"{source} record '#{index}': expected an object, got {type(item).__name__}", record=f"#{index}"
        )
    rid = _record_id(item, source, index)
    if _has_surrogates(rid):
        raise _fail(
            source,
            rid.encode("utf-8", "backslashreplace").decode(),
            "id",
            "id is not valid UTF-8",
            kind="non-UTF-8 text",
        )
    images = _images(item, source, rid)
    if any(_has_surrogates(p) for p in images):
        raise _fail(source, rid, "image", "path is not valid UTF-8", kind="non-UTF-8 text")
    if "conversations" not in item and "messages" not in item and "caption" in item:
        return _pair_record(item, source, rid, images)
    key = "messages" if "messages" in item and "conversations" not in item else "conversations"
    conv = item.get(key)
    if not isinstance(conv, list) or not conv:
        raise _fail(source, rid, key, "missing or not a non-empty list of turns")
    turns = [_turn(m, source, rid, f"{key}[{i}]") for i, m in enumerate(conv)]
    styles = ["from/value" if isinstance(m, dict) and "from" in m else "role/content" for m in conv]
    if len(set(styles)) > 1:
        other = next(i for i, s in enumerate(styles) if s != styles[0])
        raise _fail(
            source, rid, f"{key}[{other}]", f"uses {styles[other]} but {key}[0] uses {styles[0]}; use one"
        )
    meta = {k: v for k, v in item.items() if k not in _KNOWN}
    return Record(id=rid, images=images, turns=turns, meta=meta, source=source)


def _record_id(item: dict, source: str, index: int) -> str:
    """The record's id as text: a non-empty string or an integer; '#INDEX' when the record has none."""
    if "id" not in item:
        return f"#{index}"
    rid = item["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int) or (isinstance(rid, str) and not rid.strip()):
        shown = "null" if rid is None else repr(rid) if isinstance(rid, str | float) else type(rid).__name__
        raise _fail(source, f"#{index}", "id", f"expected a non-empty string or an integer, got {shown}")
    return str(rid)


def _pair_record(item: dict, source: str, rid: str, images: list[str]) -> Record:
    text = item["caption"]
    if not isinstance(text, str):
        raise _fail(source, rid, "caption", f"expected a string, got {type(text).__name__}")
    if _has_surrogates(text):
        raise _fail(source, rid, "caption", "text is not valid UTF-8", kind="non-UTF-8 text")
    if "id" not in item and images:
        rid = images[0]  # pairs files usually have no id; the image names the record
    turns = [Turn("user", IMAGE_PLACEHOLDER * len(images)), Turn("assistant", text)]
    meta = {k: v for k, v in item.items() if k not in _KNOWN}
    return Record(id=rid, images=images, turns=turns, meta=meta, source=source)


def _imagefolder(root: Path) -> tuple[list[dict], list[str]]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: an ImageFolder needs one sub-folder per class; found none", kind="bad file")
    raw = []
    for label in classes:
        for f in sorted((root / label).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                rel = f"{label}/{f.name}"
                raw.append(
                    {
                        "id": rel,
                        "image": rel,
                        "label": label,
                        "conversations": [
                            {"from": "human", "value": IMAGE_PLACEHOLDER},
                            {"from": "gpt", "value": label},
                        ],
                    }
                )
    return raw, classes


def load_records(path: str | Path, image_root: str | Path | None = None) -> RecordSet:
    """Open a LLaVA .json/.jsonl, a pairs .jsonl, or an ImageFolder directory as a lazy RecordSet.

    Args:
        path: the file or folder.
        image_root: folder the records' image paths are relative to; default the file's folder
            (the folder itself for an ImageFolder).
    Raises DataError for file-level problems (missing file, not JSON, not a list); record-level
    problems are raised when that record is indexed.
    """
    path = Path(path)
    if path.is_dir():
        raw, classes = _imagefolder(path)
        return RecordSet(path, raw, Path(image_root) if image_root else path, classes)
    if not path.exists():
        raise DataError(f"{path}: no such file", kind="bad file")
    if not path.is_file():  # a FIFO or a device would block the read, or never end it
        raise DataError(f"{path}: not a regular file (a FIFO, device or socket)", kind="bad file")
    if path.suffix not in (".json", ".jsonl"):
        raise DataError(
            f"{path}: expected a .json or .jsonl file or an ImageFolder directory", kind="bad file"
        )
    return RecordSet(path, _parse(path), Path(image_root) if image_root else path.parent)


def select_records(spec: DataSpec) -> list[Record]:
    """The records of one dataset that a stage uses: those `where` keeps, then the first `limit`, each
    `repeat` times (the copies follow the originals).

    A `where` that keeps nothing is an error naming the file and the filter (a typo in a field or
    value would otherwise train on nothing, or on everything else)."""
    records = load_records(spec.path, spec.image_root)  # lazy: parsed as reached, each once
    kept = list(islice((r for r in records if spec.selects(r.meta)), spec.limit or None))
    if spec.where and not kept:
        raise ValueError(f"{spec.path}: no record matches where={spec.where} (fields: records' extra keys)")
    return kept * spec.repeat


def caption_of(record: Record) -> str:
    """The caption of a pairs record (meta caption), else its last assistant turn."""
    if isinstance(record.meta.get("caption"), str):
        return record.meta["caption"]
    answers = [t.content for t in record.turns if t.role == "assistant"]
    if not answers:
        raise ValueError(f"{record.where()}: field caption: no caption and no assistant turn")
    return answers[-1]
