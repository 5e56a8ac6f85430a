"""Bad inputs to `vistune data validate`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import broken_images
import pytest
from bad_inputs import (
    Case,
    World,
    _bad_jpeg,
    _deep,
    _json,
    _noisy_png,
    _png,
    _rec,
    gigapixel_png,
    params,
    run_case,
)

# --- data validate ----------------------------------------------------------------------------------------

Writer = Callable[[Path, Path], Path]  # (tmp, image root) -> the data file


def _records(*records: dict, name: str = "data.json") -> Writer:
    return lambda tmp, images: _json(tmp / name, list(records))


def _raw(content: bytes | str, name: str = "data.json") -> Writer:
    def write(tmp: Path, images: Path) -> Path:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    return write


def _with_image(make: Callable[[Path], Any], image: str = "bad.png", rid: str = "r1") -> Writer:
    """One record of `image`, which `make(image_root)` writes."""

    def write(tmp: Path, images: Path) -> Path:
        made = make(images)
        name = made.name if isinstance(made, Path) and made.parent == images else image
        return _json(tmp / "data.json", [_rec("good"), _rec(rid, name)])

    return write


def _validate(name: str, needles: tuple[str, ...], write: Writer, *args: str, code: int = 1, **kw) -> Case:
    def setup(tmp: Path, world: World) -> list[str]:
        images = tmp / "images"
        _png(images / "ok.png")
        data = write(tmp, images)
        return ["data", "validate", str(data), "--image-root", str(images), *args]

    return Case("validate", name, setup, code, needles, **kw)


def _symlink_out(images: Path) -> Path:
    outside = images.parent / "outside"
    _png(outside / "secret.png")
    (images / "link.png").symlink_to(outside / "secret.png")
    return images / "link.png"


def _loop(images: Path) -> Path:
    (images / "loop.png").symlink_to(images / "loop.png")
    return images / "loop.png"


def _imagefolder_without_classes(tmp: Path, images: Path) -> Path:
    (tmp / "folder").mkdir()
    _png(tmp / "folder" / "loose.png")
    return tmp / "folder"


def validate_cases() -> list[Case]:
    """`vistune data validate FILE --image-root DIR`: every problem reported by kind with its record id."""
    r = _rec
    return [
        _validate(
            "missing-file", ("bad file", "nothere.json", "no such file"), lambda t, i: t / "nothere.json"
        ),
        _validate("zero-byte-file", ("bad file", "empty.json", "not valid JSON"), _raw(b"", "empty.json")),
        _validate("empty-jsonl", ("bad file", "empty.jsonl", "no records"), _raw(b"", "empty.jsonl")),
        _validate("empty-list", ("bad file", "data.json", "no records"), _raw("[]")),
        _validate("not-json", ("bad file", "not valid JSON (line 1"), _raw("hello")),
        _validate(
            "object-not-list", ("bad file", "expected a JSON list of records, got dict"), _raw('{"id": 1}')
        ),
        _validate("string-not-list", ("bad file", "expected a JSON list of records, got str"), _raw('"x"')),
        _validate(
            "wrong-extension", ("bad file", "data.csv", "expected a .json or .jsonl"), _raw("a,b", "data.csv")
        ),
        _validate(
            "folder-without-classes", ("bad file", "one sub-folder per class"), _imagefolder_without_classes
        ),
        _validate(
            "bad-jsonl-line",
            ("bad json (1): line 2", "not valid JSON"),
            _raw(json.dumps(r("good")) + "\n{oops\n", "data.jsonl"),
        ),
        _validate(
            "record-not-object",
            ("bad record (1): #1", "expected an object, got int"),
            _raw(json.dumps([_rec("good")])[:-1] + ", 42]"),
        ),
        _validate(
            "no-conversations", ("bad record (1): r1", "field 'conversations'"), _records({"id": "r1"})
        ),
        _validate(
            "conversations-string",
            ("bad record (1): r1", "field 'conversations'"),
            _records({"id": "r1", "conversations": "hi"}),
        ),
        _validate(
            "conversations-empty",
            ("bad record (1): r1", "non-empty list"),
            _records({"id": "r1", "conversations": []}),
        ),
        _validate(
            "turn-not-object",
            ("bad record (1): r1", "field 'conversations[0]'", "expected an object"),
            _records({"id": "r1", "conversations": ["hi"]}),
        ),
        _validate(
            "unknown-role",
            ("bad role (1): r1", "'robot'"),
            _records(r("r1", conv=[["human", "<image>"], ["robot", "x"]])),
        ),
        _validate(
            "messages-unknown-role",
            ("bad role (1): r1", "field 'messages[0].role'"),
            _records({"id": "r1", "messages": [{"role": "bot", "content": "x"}]}),
        ),
        _validate(
            "null-content",
            ("bad record (1): r1", "field 'conversations[1].value'", "got NoneType"),
            _records(r("r1", conv=[["human", "<image>"], ["gpt", None]])),
        ),
        _validate(
            "number-content",
            ("bad record (1): r1", "got int"),
            _records(r("r1", conv=[["human", "<image>"], ["gpt", 4]])),
        ),
        _validate(
            "non-utf8-text",
            ("non-UTF-8 text (1): r1",),
            _raw(
                b'[{"id": "r1", "conversations": [{"from": "human", "value": "caf\xe9"}, '
                b'{"from": "gpt", "value": "x"}]}]'
            ),
        ),
        _validate(
            "non-utf8-id",
            ("non-UTF-8 text (1)", "field 'id'"),
            _raw(
                b'[{"id": "caf\xe9", "conversations": [{"from": "human", "value": "x"}, '
                b'{"from": "gpt", "value": "y"}]}]'
            ),
        ),
        _validate("image-number", ("bad record (1): r1", "field 'image'"), _records(r("r1", image=7))),  # type: ignore[arg-type]
        _validate(
            "image-list-with-null",
            ("bad record (1): r1", "field 'image'"),
            _records({**r("r1"), "image": ["ok.png", None]}),
        ),
        _validate("image-empty-string", ("bad record (1): r1", "field 'image'"), _records(r("r1", image=""))),
        _validate(
            "two-placeholders-one-image",
            ("placeholder mismatch (1): r1", "2 <image> placeholder(s) for 1"),
            _records(r("r1", conv=[["human", "<image> <image>"], ["gpt", "x"]])),
        ),
        _validate(
            "image-without-placeholder",
            ("placeholder mismatch (1): r1", "0 <image>"),
            _records(r("r1", conv=[["human", "What?"], ["gpt", "x"]])),
        ),
        _validate(
            "placeholder-without-image",
            ("placeholder mismatch (1): r1", "for 0 image"),
            _records(r("r1", image=None)),
        ),
        _validate(
            "empty-turn",
            ("empty turn (1): r1",),
            _records(r("r1", conv=[["human", "<image>"], ["gpt", "  "]])),
        ),
        _validate(
            "assistant-first",
            ("bad role (1): r1", "start with a user turn"),
            _records(r("r1", conv=[["gpt", "<image>"], ["human", "x"]])),
        ),
        _validate(
            "late-system-turn",
            ("bad role (1): r1", "system turn may only come first"),
            _records(r("r1", conv=[["human", "<image>"], ["system", "x"], ["gpt", "y"]])),
        ),
        _validate(
            "caption-not-string",
            ("bad record (1): #0", "pairs.json", "field 'caption'"),
            _records({"image": "ok.png", "caption": 5}, name="pairs.json"),
        ),
        _validate(
            "missing-image",
            ("missing image (1): r1", "nothere.png"),
            _with_image(lambda i: None, "nothere.png"),
        ),
        _validate(
            "zero-byte-image",
            ("zero-byte image (1): r1",),
            _with_image(lambda i: (i / "bad.png").write_bytes(b"")),
        ),
        _validate(
            "text-as-image",
            ("unreadable image (1): r1", "bad.png"),
            _with_image(lambda i: (i / "bad.png").write_text("no")),
        ),
        _validate(
            "directory-as-image",
            ("unreadable image (1): r1",),
            _with_image(lambda i: (i / "bad.png").mkdir()),
        ),
        _validate(
            "cut-png",
            ("truncated image (1): r1",),
            _with_image(lambda i: (i / "bad.png").write_bytes(_noisy_png(i / "n.png").read_bytes()[:3000])),
        ),
        _validate(
            "cut-zlib-stream-png",
            ("truncated image (1): r1",),
            _with_image(lambda i: broken_images.cut_stream_png(i / "bad.png")),
        ),
        _validate(
            "short-pixel-data-png",
            ("truncated image (1): r1", "ends"),
            _with_image(lambda i: broken_images.short_png(i / "bad.png")),
        ),
        _validate(
            "short-interlaced-png",
            ("truncated image (1): r1",),
            _with_image(lambda i: broken_images.short_png(i / "bad.png", interlaced=True)),
        ),
        _validate("cut-progressive-jpeg", ("truncated image (1): r1",), _with_image(_bad_jpeg)),
        _validate(
            "gigapixel-header",
            ("too-large image (1): r1", "100000x100000"),
            _with_image(lambda i: (i / "bad.png").write_bytes(gigapixel_png())),
        ),
        _validate(
            "over-max-pixels-flag",
            ("too-large image (1): r1", "limit of 300"),
            _with_image(lambda i: _png(i / "bad.png", (32, 32))),
            "--max-pixels",
            "300",
        ),
        _validate(
            "dotdot-path", ("path escapes root (1): r1",), _records(r("good"), r("r1", "../images/ok.png"))
        ),
        _validate(
            "absolute-path",
            ("path escapes root (1): r1",),
            lambda t, i: _json(t / "data.json", [r("r1", str(i / "ok.png"))]),
        ),
        _validate(
            "windows-drive-path", ("path escapes root (1): r1",), _records(r("r1", "C:\\data\\ok.png"))
        ),
        _validate(
            "symlink-out-of-root", ("path escapes root (1): r1", "resolves to"), _with_image(_symlink_out)
        ),
        _validate("symlink-loop", ("unreadable image (1): r1",), _with_image(_loop)),
        _validate("json-nested-100k-deep", ("bad file", "nested too deeply"), _raw(_deep())),
        _validate(
            "jsonl-line-nested-100k-deep",
            ("bad json (1): line 1", "nested too deeply"),
            _raw(_deep() + "\n", "data.jsonl"),
        ),
        _validate(
            "max-pixels-not-a-number",
            ("--max-pixels", "invalid int value"),
            _records(r("good")),
            "--max-pixels",
            "lots",
            code=2,
        ),
    ]


CASES = validate_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
