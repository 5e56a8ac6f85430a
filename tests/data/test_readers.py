"""Tests for the readers: LLaVA JSON/JSONL in both role styles, pairs, ImageFolder, and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vistune.config import DataSpec
from vistune.data.readers import DataError, load_records, select_records
from vistune.data.records import Record, Turn
from vistune.shapes import synth

LLAVA = [
    {
        "id": "a",
        "image": "imgs/a.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "What colour?"},
            {"from": "gpt", "value": "Black."},
        ],
        "question_type": "color",
        "answer": "black",
    },
    {
        "id": "b",
        "conversations": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi"},
        ],
    },
    {
        "id": "c",
        "image": ["x.png", "y.png"],
        "conversations": [
            {"from": "human", "value": "<image> and <image>: same?"},
            {"from": "gpt", "value": "no"},
        ],
    },
]


def _write(path: Path, records, jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("jsonl", [False, True])
def test_both_role_styles_no_image_and_multiple_images(tmp_path, jsonl):
    records = load_records(_write(tmp_path / f"d.json{'l' if jsonl else ''}", LLAVA, jsonl))
    assert len(records) == 3 and records.image_root == tmp_path
    a, b, c = records
    assert a == Record(
        id="a",
        images=["imgs/a.png"],
        turns=[
            Turn("user", "<image>\nWhat is this?"),
            Turn("assistant", "A cat."),
            Turn("user", "What colour?"),
            Turn("assistant", "Black."),
        ],
        meta={"question_type": "color", "answer": "black"},
        source=str(tmp_path / f"d.json{'l' if jsonl else ''}"),
    )
    assert b.images == [] and [t.role for t in b.turns] == ["system", "user", "assistant"]
    assert c.images == ["x.png", "y.png"]
    assert records[-1].id == "c" and [r.id for r in records[0:2]] == ["a", "b"]


def test_reader_is_lazy_and_never_opens_images(tmp_path):
    # The images do not exist: reading must still work; only indexing builds records.
    records = load_records(_write(tmp_path / "d.json", LLAVA), image_root=tmp_path / "nowhere")
    assert records.image_root == tmp_path / "nowhere"
    assert records.raw(0) is records._raw[0] and records[0].images == ["imgs/a.png"]


def test_pairs_jsonl(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", [{"image": "p/1.png", "caption": "a red star"}], jsonl=True)
    (rec,) = load_records(path)
    assert rec.id == "p/1.png" and rec.images == ["p/1.png"]
    assert rec.turns == [Turn("user", "<image>"), Turn("assistant", "a red star")]
    assert rec.meta == {"caption": "a red star"}


def test_imagefolder(tmp_path):
    for label, n in (("dog", 2), ("cat", 1)):
        (tmp_path / label).mkdir()
        for i in range(n):
            Image.new("RGB", (4, 4)).save(tmp_path / label / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    records = load_records(tmp_path)
    assert records.classes == ["cat", "dog"]
    assert [(r.images, r.meta["label"]) for r in records] == [
        (["cat/0.png"], "cat"),
        (["dog/0.png"], "dog"),
        (["dog/1.png"], "dog"),
    ]


def test_synthesized_files_read_back(tmp_path):
    synth.synthesize(tmp_path, {"train": 3}, seed=1, workers=1)
    vqa = load_records(tmp_path / "train" / "vqa.json", image_root=tmp_path / "images")
    assert len(vqa) >= 3 and all((tmp_path / "images" / r.images[0]).is_file() for r in vqa)
    assert {"question_type", "answer", "params"} <= set(vqa[0].meta)
    pope = load_records(tmp_path / "train" / "pope.json")
    assert {r.meta["pope_setting"] for r in pope} == {"random", "popular", "adversarial"}


@pytest.mark.parametrize(
    "bad, field, kind",
    [
        (
            {"id": "r1", "conversations": [{"from": "robot", "value": "hi"}]},
            "conversations[0].from",
            "bad role",
        ),
        ({"id": "r1", "conversations": [{"role": "user"}]}, "conversations[0].content", "bad record"),
        ({"id": "r1", "image": 3, "conversations": [{"from": "human", "value": "x"}]}, "image", "bad record"),
        ({"id": "r1"}, "conversations", "bad record"),
        ({"id": "r1", "conversations": []}, "conversations", "bad record"),
        ({"id": "r1", "conversations": ["hello"]}, "conversations[0]", "bad record"),
        ({"id": "r1", "image": "a.png", "caption": 5}, "caption", "bad record"),
    ],
)
def test_bad_records_name_file_record_and_field(tmp_path, bad, field, kind):
    good = {"id": "ok", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path = _write(tmp_path / "d.json", [good, bad])
    records = load_records(path)
    assert records[0].id == "ok"  # one bad record does not spoil the others
    with pytest.raises(DataError) as err:
        records[1]
    message = str(err.value)
    assert str(path) in message and "'r1'" in message and repr(field) in message
    assert err.value.kind == kind and err.value.record == "r1"


def test_record_without_id_is_named_by_index(tmp_path):
    path = _write(tmp_path / "d.json", [{"conversations": "nope"}])
    with pytest.raises(DataError, match=r"record '#0': field 'conversations'"):
        load_records(path)[0]


def test_bad_jsonl_line_is_named_and_others_still_read(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(LLAVA[1]) + "\n{broken\n" + json.dumps(LLAVA[2]) + "\n")
    records = load_records(path)
    assert len(records) == 3 and records[2].id == "c"
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON") as err:
        records[1]
    assert err.value.kind == "bad json"


def test_non_utf8_text_is_flagged_per_record(tmp_path):
    path = tmp_path / "d.json"
    good = json.dumps(LLAVA[1]).encode()
    bad = b'{"id": "bin", "conversations": [{"from": "human", "value": "caf\xe9"}]}'
    path.write_bytes(b"[" + good + b", " + bad + b"]")
    records = load_records(path)
    assert records[0].id == "b"
    with pytest.raises(DataError, match="not valid UTF-8") as err:
        records[1]
    assert err.value.kind == "non-UTF-8 text" and err.value.record == "bin"


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("d.json", "{not json", "not valid JSON"),
        ("d.json", '{"id": 1}', "expected a JSON list"),
        ("d.csv", "a,b", "expected a .json or .jsonl"),
        ("missing.json", None, "no such file"),
    ],
)
def test_file_level_errors_name_the_file(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as err:
        load_records(path)
    assert str(path) in str(err.value) and err.value.kind == "bad file"


def test_empty_imagefolder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="one sub-folder per class"):
        load_records(tmp_path)


def test_where_selects_by_extra_field_before_limit(tmp_path):
    from vistune.config import DataSpec
    from vistune.data.readers import select_records as select

    types = ["color", "count", "spatial", "count", "shape", "spatial", "count"]
    records = [
        {
            "id": f"r{i}",
            "question_type": t,
            "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
        }
        for i, t in enumerate(types)
    ]
    path = tmp_path / "vqa.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    picked = select(DataSpec(str(path), limit=3, where={"question_type": ["spatial", "count"]}))
    assert [r.id for r in picked] == ["r1", "r2", "r3"]  # file order, limit counts kept records
    assert [r.id for r in select(DataSpec(str(path), where={"question_type": "shape"}))] == ["r4"]
    assert [r.id for r in select(DataSpec(str(path), limit=2))] == ["r0", "r1"]
    with pytest.raises(
        ValueError, match=r"vqa\.json: no record matches where=\{'question_type': \['size'\]\}"
    ):
        select(DataSpec(str(path), where={"question_type": ["size"]}))


def test_repeat_weights_a_dataset_and_must_be_positive(tmp_path):
    path = tmp_path / "text.json"
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    rows = [{"id": f"r{i}", "conversations": turns} for i in range(2)]
    path.write_text(json.dumps(rows))
    kept = select_records(DataSpec(path=str(path), limit=1, repeat=3))
    assert [r.id for r in kept] == ["r0", "r0", "r0"]
    with pytest.raises(ValueError, match="repeat must be at least 1, got 0"):
        DataSpec(path=str(path), repeat=0)
