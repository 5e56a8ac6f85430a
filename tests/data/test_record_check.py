"""`vistune data validate` and training share one record check: over a corpus of bad records, validation
flags exactly the records training refuses (or, with `on_bad_record: skip`, skips), and passes the rest."""

from __future__ import annotations

import json
import math
import os

import broken_images
import pytest
from PIL import Image

from vistune.config import DataSpec
from vistune.data.readers import DataError, load_records
from vistune.data.validate import main_validate, validate
from vistune.model.template import RenderError
from vistune.train.conversations import ConversationData


def _llava(rid, *turns, image="ok.png"):
    out = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
    return out | ({"image": image} if image else {})


ASK, ANSWER = ("human", "<image>\nWhat is it?"), ("gpt", "A square.")
GOOD = [
    _llava("good", ASK, ANSWER),
    _llava("text-only", ("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello"), image=None),
    {"id": 7, "image": "ok.png", "messages": [{"role": "user", "content": "<image>\nAnd?"},
                                              {"role": "assistant", "content": "A circle."}]},
]  # fmt: skip
# name -> a record training refuses; each must fail validation.
BAD = {
    "only-a-user-turn": _llava("only-user", ASK),
    "image-only-in-the-answer": _llava("img-answer", ("human", "What is it?"), ("gpt", "<image>")),
    "duplicate-id-other-answer": _llava("good", ASK, ("gpt", "A circle.")),
    "id-an-object": _llava("x", ASK, ANSWER) | {"id": {"a": 1}},
    "id-null": _llava(None, ASK, ANSWER),
    "id-nan": _llava(math.nan, ASK, ANSWER),
    "id-empty": _llava("", ASK, ANSWER),
    "turn-mixes-from-and-content": {"id": "mix1", "image": "ok.png", "conversations": [
        {"from": "human", "content": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]},
    "turn-mixes-role-and-value": {"id": "mix2", "image": "ok.png", "conversations": [
        {"role": "user", "value": "<image>\nWhat?", "from": "human"}, {"from": "gpt", "value": "x"}]},
    "turns-mix-styles": {"id": "mix3", "image": "ok.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"role": "assistant", "content": "x"}]},
    "assistant-first": _llava("gpt-first", ("gpt", "<image>"), ("human", "x")),
    "user-twice": _llava("user-twice", ASK, ("human", "x"), ANSWER),
    "system-not-first": _llava("sys-late", ASK, ("system", "s"), ANSWER),
    "system-only": _llava("sys-only", ("system", "s"), image=None),
    "unknown-role": _llava("robot", ASK, ("robot", "x")),
    "empty-answer": _llava("blank", ASK, ("gpt", "  ")),
    "two-placeholders-one-image": _llava("two", ("human", "<image> <image>"), ANSWER),
    "image-without-placeholder": _llava("no-ph", ("human", "What?"), ANSWER),
    "missing-image": _llava("no-file", ASK, ANSWER, image="nothere.png"),
    "truncated-png": _llava("short", ASK, ANSWER, image="short.png"),
    "zero-byte-image": _llava("empty-img", ASK, ANSWER, image="empty.png"),
    "not-an-image": _llava("junk", ASK, ANSWER, image="junk.png"),
    "image-a-fifo": _llava("fifo", ASK, ANSWER, image="fifo.png"),
    "path-escapes-root": _llava("escape", ASK, ANSWER, image="../ok.png"),
    "image-not-a-string": _llava("img-num", ASK, ANSWER, image=5),
    "no-conversations": {"id": "no-conv", "image": "ok.png"},
    "not-an-object": [1, 2],
    "text-not-a-string": _llava("num", ("human", 3), ("gpt", "x"), image=None),
}  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("records") / "images"
    root.mkdir()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(root / "ok.png")
    broken_images.short_png(root / "short.png")
    (root / "empty.png").write_bytes(b"")
    (root / "junk.png").write_text("not an image")
    os.mkfifo(root / "fifo.png")
    return root


def _write(path, records) -> str:
    path.write_text("[" + ",\n".join(json.dumps(r) for r in records) + "]")
    return str(path)


def _train(path, root, tok, on_bad):
    spec = DataSpec(path=path, image_root=str(root))
    return ConversationData([spec], tok, image_tokens=2, max_length=512, on_bad_record=on_bad)


def test_validation_flags_exactly_what_training_skips(root, tmp_path, smollm2_tokenizer):
    """The whole corpus in one file: training (skip) keeps exactly the records validation passes."""
    path = _write(tmp_path / "all.json", [*GOOD, *BAD.values()])
    report = validate(path, root)
    flagged = {p.record for p in report.problems if p.kind != "duplicate id"}
    records = load_records(path, root)
    passed, seen = [], set()
    for i in range(len(records)):  # a duplicate id is the problem of the later record only
        raw = records.raw(i)
        rid = str(raw.get("id", f"#{i}")) if isinstance(raw, dict) else f"#{i}"
        if rid not in flagged and f"#{i}" not in flagged and rid not in seen:
            passed.append(rid)
        seen.add(rid)
    assert passed == ["good", "text-only", "7"], report.format()
    data = _train(path, root, smollm2_tokenizer, "skip")
    kept = [s.where.rsplit(" record ", 1)[1].strip("'") for s in data.samples]
    assert kept == passed
    assert data.counts["skipped_bad"] == len(BAD) and data.counts["kept"] == len(GOOD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_bad_record_fails_validation_and_stops_training(name, root, tmp_path, smollm2_tokenizer, capsys):
    path = _write(tmp_path / "one.json", [GOOD[0], BAD[name]])
    assert main_validate([path, "--image-root", str(root)]) == 1
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises((DataError, RenderError)) as err:
        _train(path, root, smollm2_tokenizer, "raise")
    assert path in str(err.value) and "\n" not in str(err.value)


def test_the_good_records_pass_both(root, tmp_path, smollm2_tokenizer):
    path = _write(tmp_path / "good.json", GOOD)
    assert validate(path, root).ok
    assert len(_train(path, root, smollm2_tokenizer, "raise")) == len(GOOD)


def test_show_takes_zero_or_more(root, tmp_path, capsys):
    path = _write(tmp_path / "good.json", GOOD)
    with pytest.raises(SystemExit):
        main_validate([path, "--show", "-1"])
    assert "--show" in capsys.readouterr().err
    assert main_validate([path, "--image-root", str(root), "--show", "0"]) == 0


def test_a_fifo_given_to_validate_is_refused_at_once(tmp_path):
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    report = validate(fifo)
    assert not report.ok and "not a regular file" in report.problems[0].detail
