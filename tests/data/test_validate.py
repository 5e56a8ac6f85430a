"""Tests for validation: every problem kind on a deliberately broken dataset, the report, the gate."""

from __future__ import annotations

import json

import broken_images
import numpy as np
import pytest
from PIL import Image

from vistune.data import validate as validate_module
from vistune.data.images import ImageError, load_image
from vistune.data.readers import DataError
from vistune.data.records import Record, Turn
from vistune.data.validate import (
    PROBLEM_KINDS,
    check_record,
    ensure_valid,
    escapes_root,
    main_validate,
    validate,
)
from vistune.shapes import synth


def _rec(rid, image="ok.png", conv=None, **extra):
    conv = conv or [["human", "<image>\nWhat?"], ["gpt", "A square."]]
    out = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in conv], **extra}
    if image is not None:
        out["image"] = image
    return out


@pytest.fixture()
def broken(tmp_path):
    """A file with one good record and one record per problem kind; returns (path, expected kinds)."""
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "ok.png")
    Image.new("RGB", (200, 200)).save(root / "huge.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(root / "n.png")
    (root / "cut.png").write_bytes((root / "n.png").read_bytes()[:3000])
    (root / "empty.png").write_bytes(b"")
    (root / "junk.png").write_text("not an image")
    expected = {
        "good": None,
        "text-only": None,
        "no-file": "missing image",
        "junk": "unreadable image",
        "cut": "truncated image",
        "empty": "zero-byte image",
        "huge": "too-large image",
        "two-placeholders": "placeholder mismatch",
        "robot": "bad role",
        "gpt-first": "bad role",
        "user-twice": "bad role",
        "blank": "empty turn",
        "escape": "path escapes root",
        "absolute": "path escapes root",
        "latin1": "non-UTF-8 text",
    }
    records = [
        _rec("good"),
        _rec("text-only", image=None, conv=[["system", "Be kind."], ["human", "Hi"], ["gpt", "Hello"]]),
        _rec("no-file", "nothere.png"),
        _rec("junk", "junk.png"),
        _rec("cut", "cut.png"),
        _rec("empty", "empty.png"),
        _rec("huge", "huge.png"),
        _rec("two-placeholders", conv=[["human", "<image> <image>"], ["gpt", "x"]]),
        _rec("robot", conv=[["human", "<image>"], ["robot", "x"]]),
        _rec("gpt-first", conv=[["gpt", "<image>"], ["human", "x"]]),
        _rec("user-twice", conv=[["human", "<image>"], ["human", "x"], ["gpt", "y"]]),
        _rec("blank", conv=[["human", "<image>\nWhat?"], ["gpt", "  "]]),
        _rec("escape", "../images/ok.png"),
        _rec("absolute", str(root / "ok.png")),
    ]
    body = ",\n".join(json.dumps(r) for r in records).encode()
    latin1 = b'{"id": "latin1", "image": "ok.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}'
    path = tmp_path / "data.json"
    path.write_bytes(b"[" + body + b",\n" + latin1 + b"]")
    return path, root, expected


def test_every_problem_kind_is_found_on_its_record(broken):
    path, root, expected = broken
    report = validate(path, root, max_pixels=100 * 100)
    assert report.records == len(expected)
    found = {}
    for p in report.problems:
        found.setdefault(p.record, set()).add(p.kind)
    for rid, kind in expected.items():
        assert found.get(rid, set()) == ({kind} if kind else set()), rid
    groups = report.by_kind()
    assert set(groups) == {k for k in expected.values() if k}
    assert [p.record for p in groups["bad role"]] == ["robot", "gpt-first", "user-twice"]
    assert all(k in PROBLEM_KINDS for k in groups)


def test_report_text_and_exit_code(broken, tmp_path, capsys):
    path, root, _ = broken
    assert main_validate([str(path), "--image-root", str(root), "--max-pixels", "10000"]) == 1
    text = capsys.readouterr().out
    assert "15 records checked" in text and "FAILED" in text
    assert "missing image (1): no-file" in text and "bad role (3): robot, gpt-first, user-twice" in text
    synth.synthesize(tmp_path / "shapes", {"val": 4}, workers=1)
    vqa = tmp_path / "shapes" / "val" / "vqa.json"
    assert main_validate([str(vqa), "--image-root", str(tmp_path / "shapes" / "images")]) == 0
    assert capsys.readouterr().out.splitlines()[1] == "OK"


@pytest.mark.parametrize(
    "content, kind",
    [(b"[{]", "bad file"), (b'{"a": 1}', "bad file"), (b'{"id": "x"}\n{oops\n', "bad json")],
)
def test_file_and_line_level_problems(tmp_path, content, kind):
    path = tmp_path / ("d.jsonl" if b"\n" in content else "d.json")
    path.write_bytes(content)
    report = validate(path, tmp_path)
    assert kind in report.by_kind() and not report.ok
    problem = report.by_kind()[kind][0]
    assert str(path) in problem.detail
    if kind == "bad json":
        assert problem.record == "line 2" and "bad record" in report.by_kind()  # line 1 lacks conversations


def test_check_record_on_hand_built_records(tmp_path):
    rec = Record("h", [], [Turn("user", "caf\udce9"), Turn("assistant", "ok")], source="mem")
    assert [p.kind for p in check_record(rec, tmp_path)] == ["non-UTF-8 text"]
    rec = Record("s", [], [Turn("user", "a"), Turn("system", "b"), Turn("assistant", "c")])
    assert [p.kind for p in check_record(rec, tmp_path)] == ["bad role"]
    rec = Record("w", ["C:\\data\\x.png"], [Turn("user", "<image>"), Turn("assistant", "c")])
    assert [p.kind for p in check_record(rec, tmp_path)] == ["path escapes root"]


def test_ensure_valid_raises_or_skips(broken):
    path, root, _ = broken
    good = Record("good", ["ok.png"], [Turn("user", "<image>"), Turn("assistant", "x")], source=str(path))
    bad = Record(
        "no-file", ["nothere.png"], [Turn("user", "<image>"), Turn("assistant", "x")], source=str(path)
    )
    assert ensure_valid(good, root) is True
    assert ensure_valid(bad, root, on_bad="skip") is False
    with pytest.raises(DataError, match=r"data.json record 'no-file': missing image") as err:
        ensure_valid(bad, root)
    assert err.value.kind == "missing image" and err.value.record == "no-file"
    with pytest.raises(ValueError, match="on_bad must be one of"):
        ensure_valid(good, root, on_bad="ignore")


# --- images decoded as training loads them; symlinks out of the root (issue 18) ---------------------------


def _records_file(tmp_path, images: dict[str, str]):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([_rec(rid, image) for rid, image in images.items()]), encoding="utf-8")
    return path


def test_images_that_training_cannot_decode_fail_validation(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    Image.new("RGB", (32, 32)).save(root / "ok.png")
    broken_images.cut_stream_png(root / "cut-stream.png")
    broken_images.short_png(root / "short.png")
    bad_jpegs = [p for p in broken_images.progressive_jpeg_cuts(root) if not _loads(p)]
    assert bad_jpegs
    images = {"good": "ok.png", "cut": "cut-stream.png", "short": "short.png", "jpeg": bad_jpegs[0].name}
    report = validate(_records_file(tmp_path, images), root)
    kinds = {p.record: p.kind for p in report.problems}
    assert kinds == {"cut": "truncated image", "short": "truncated image", "jpeg": "truncated image"}


def _loads(path) -> bool:
    try:
        load_image(path)
    except ImageError:
        return False
    return True


def test_a_symlink_out_of_the_root_escapes_it(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    Image.new("RGB", (8, 8)).save(outside / "secret.png")
    Image.new("RGB", (8, 8)).save(root / "ok.png")
    (root / "link.png").symlink_to(outside / "secret.png")
    (root / "dir").symlink_to(outside)
    (root / "inner.png").symlink_to(root / "ok.png")  # a link that stays inside is fine
    (root / "loop.png").symlink_to(root / "loop.png")
    images = {"good": "ok.png", "inner": "inner.png", "file": "link.png", "dir": "dir/secret.png"}
    report = validate(_records_file(tmp_path, images | {"loop": "loop.png"}), root)
    found = {p.record: p for p in report.problems}
    assert set(found) == {"file", "dir", "loop"}
    for rid in ("file", "dir"):
        assert found[rid].kind == "path escapes root"
        assert "resolves to" in found[rid].detail and str(outside) in found[rid].detail
    assert found["loop"].kind == "unreadable image" and "symbolic links" in found["loop"].detail
    assert escapes_root("link.png", root) and escapes_root("dir/secret.png", root)
    assert not escapes_root("inner.png", root) and not escapes_root("link.png")  # text only: fine
    assert escapes_root("../x.png") and escapes_root("/etc/passwd", root)  # the text check stays


def test_a_symlinked_root_is_not_an_escape(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "ok.png")
    (tmp_path / "root").symlink_to(real)
    assert validate(_records_file(tmp_path, {"good": "ok.png"}), tmp_path / "root").ok


def test_each_image_is_decoded_once_however_many_records_share_it(broken, monkeypatch):
    path, root, _ = broken
    calls = []
    real = validate_module.check_image
    monkeypatch.setattr(validate_module, "check_image", lambda p, m: calls.append(p) or real(p, m))
    records = [
        Record(f"r{i}", ["ok.png"], [Turn("user", "<image>"), Turn("assistant", "x")]) for i in range(5)
    ]
    cache: dict = {}
    assert all(ensure_valid(r, root, cache=cache) for r in records)
    assert calls == [root / "ok.png"]
