"""Benchmark loaders on tiny hand-made files in each official layout."""

from __future__ import annotations

import json

import pytest

from vistune.eval import loaders


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_vqav2_questions_and_annotations(tmp_path):
    q = _write(
        tmp_path / "q.json",
        {
            "data_subtype": "val2014",
            "questions": [
                {"question_id": 1, "image_id": 42, "question": "What color is the bus?"},
                {"question_id": 2, "image_id": 7, "question": "How many dogs?"},
            ],
        },
    )
    answers = [{"answer": a, "answer_id": i + 1} for i, a in enumerate(["red"] * 8 + ["orange"] * 2)]
    a = _write(
        tmp_path / "a.json",
        {
            "annotations": [
                {
                    "question_id": 1,
                    "question_type": "what color is the",
                    "answer_type": "other",
                    "multiple_choice_answer": "red",
                    "answers": answers,
                },
                {
                    "question_id": 2,
                    "question_type": "how many",
                    "answer_type": "number",
                    "multiple_choice_answer": "2",
                    "answers": [{"answer": "2", "answer_id": 1}] * 10,
                },
            ]
        },
    )
    records = loaders.load_vqav2(q, a)
    assert [r.id for r in records] == ["1", "2"]
    r = records[0]
    assert r.images == ["val2014/COCO_val2014_000000000042.jpg"]
    assert r.turns[0].role == "user" and r.turns[0].content.startswith("<image>\nWhat color is the bus?")
    assert loaders.SHORT_ANSWER in r.turns[0].content
    assert len(r.meta["answers"]) == 10 and r.meta["question_type"] == "what color is the"
    assert records[1].meta["answer_type"] == "number"
    assert loaders.load_vqav2(q)[0].meta == {}  # questions only: no references


def test_vqav2_missing_annotation_names_question(tmp_path):
    q = _write(tmp_path / "q.json", {"questions": [{"question_id": 9, "image_id": 1, "question": "?"}]})
    a = _write(tmp_path / "a.json", {"annotations": []})
    with pytest.raises(ValueError, match="question_id 9"):
        loaders.load_vqav2(q, a)


def test_gqa_balanced_questions(tmp_path):
    path = _write(
        tmp_path / "testdev_balanced_questions.json",
        {
            "201307251": {
                "imageId": "n15740",
                "question": "Is the sky blue?",
                "answer": "yes",
                "types": {"structural": "verify", "semantic": "attr"},
            },
            "201640614": {"imageId": "n41021", "question": "What is on the table?", "answer": "cup"},
        },
    )
    records = loaders.load_gqa(path)
    assert records[0].images == ["n15740.jpg"] and records[0].meta["question_type"] == "verify"
    assert records[1].meta == {"answers": ["cup"], "answer": "cup", "question_type": "unknown"}


def test_gqa_missing_field_names_entry(tmp_path):
    path = _write(tmp_path / "g.json", {"123": {"imageId": "x", "question": "q?"}})
    with pytest.raises(ValueError, match="entry '123': missing field 'answer'"):
        loaders.load_gqa(path)


def test_pope_jsonl(tmp_path):
    path = tmp_path / "coco_pope_adversarial.json"
    lines = [
        {
            "question_id": 1,
            "image": "COCO_val2014_1.jpg",
            "text": "Is there a dog in the image?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_1.jpg",
            "text": "Is there a car in the image?",
            "label": "No",
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    records = loaders.load_pope(path)
    assert [r.meta["answer"] for r in records] == ["yes", "no"]
    assert {r.meta["pope_setting"] for r in records} == {"adversarial"}
    assert loaders.load_pope(path, setting="random")[0].meta["pope_setting"] == "random"
    path.write_text(json.dumps({**lines[0], "label": "maybe"}))
    with pytest.raises(ValueError, match="yes/no"):
        loaders.load_pope(path)


def test_textvqa(tmp_path):
    path = _write(
        tmp_path / "TextVQA_0.5.1_val.json",
        {
            "data": [
                {
                    "question_id": 34602,
                    "image_id": "003a8ae2ef43b901",
                    "question": "what brand?",
                    "answers": ["nokia"] * 9 + ["nokia phone"],
                }
            ]
        },
    )
    (r,) = loaders.load_textvqa(path)
    assert r.images == ["003a8ae2ef43b901.jpg"] and len(r.meta["answers"]) == 10


def test_llava_file_keeps_bad_records_as_stand_ins(tmp_path):
    pytest.importorskip("vistune.data.readers")
    path = _write(
        tmp_path / "vqa.json",
        [
            {
                "id": "ok",
                "image": "a.png",
                "question_type": "color",
                "answer": "red",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color?"},
                    {"from": "gpt", "value": "red"},
                ],
            },
            {"id": "bad", "image": "b.png", "conversations": [{"from": "robot", "value": "hi"}]},
        ],
    )
    ok, bad = loaders.load_llava(path)
    assert ok.meta["question_type"] == "color" and ok.turns[0].role == "user"
    assert bad.id == "bad" and "robot" in bad.meta[loaders.LOAD_ERROR]


def test_unknown_format_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match="valid formats: llava, vqav2, gqa, pope, textvqa"):
        loaders.load_eval_records("coco", tmp_path / "x.json")
    with pytest.raises(ValueError, match="only used with --format vqav2"):
        loaders.load_eval_records("gqa", tmp_path / "x.json", annotations=tmp_path / "a.json")


def test_textvqa_answers_as_a_string_are_refused_not_split_into_letters(tmp_path):
    entry = {"question_id": 1, "image_id": "x", "question": "what brand?", "answers": "nokia"}
    path = _write(tmp_path / "t.json", {"data": [entry]})
    with pytest.raises(ValueError, match=r"entry 1: field 'answers': expected a list"):
        loaders.load_textvqa(path)
    _write(path, {"data": [{**entry, "answers": ["nokia", None]}]})
    with pytest.raises(ValueError, match=r"field 'answers\[1\]': expected a string, got null"):
        loaders.load_textvqa(path)


@pytest.mark.parametrize(
    "annotation, message",
    [
        ({"question_id": 1, "answers": ["red"] * 10}, r"entry '1 answers\[0\]': expected a JSON object"),
        (
            {"question_id": 1, "answers": [{"answer": None}] * 10},
            r"field 'answer': expected a string, got null",
        ),
        ({"question_id": 1, "answers": "red"}, r"field 'answers': expected a list"),
    ],
)
def test_vqav2_mistyped_annotations_name_the_field(tmp_path, annotation, message):
    q = _write(tmp_path / "q.json", {"questions": [{"question_id": 1, "image_id": 1, "question": "?"}]})
    a = _write(tmp_path / "a.json", {"annotations": [annotation]})
    with pytest.raises(ValueError, match=message):
        loaders.load_vqav2(q, a)
    _write(q, [1, 2])
    with pytest.raises(ValueError, match="expected a JSON object at the top, got list"):
        loaders.load_vqav2(q, a)


def test_mistyped_entries_name_the_field(tmp_path):
    gqa = _write(tmp_path / "g.json", {"7": {"imageId": "x", "question": "q?", "answer": ["yes"]}})
    with pytest.raises(ValueError, match="entry '7': field 'answer': expected a string, got list"):
        loaders.load_gqa(gqa)
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text(json.dumps({"question_id": 3, "image": "a.jpg", "text": "Is there?", "label": None}))
    with pytest.raises(ValueError, match="entry 3: field 'label': expected a string, got null"):
        loaders.load_pope(pope)
    pope.write_text("[1]\n")
    with pytest.raises(ValueError, match="entry 'line 1': expected a JSON object"):
        loaders.load_pope(pope)


@pytest.mark.parametrize("fmt, name", [("llava", "d.json"), ("gqa", "g.json"), ("pope", "p.json")])
def test_json_nested_too_deeply_is_a_value_error(tmp_path, fmt, name):
    path = tmp_path / name
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        loaders.load_eval_records(fmt, path)


def test_a_jsonl_line_nested_too_deeply_is_that_record_s_failure(tmp_path):
    path = tmp_path / "d.jsonl"
    good = '{"id": "ok", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
    path.write_text(good + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    records = loaders.load_eval_records("llava", path)
    assert records[0].id == "ok" and loaders.LOAD_ERROR not in records[0].meta
    assert "line 2: not valid JSON (nested too deeply to read)" in records[1].meta[loaders.LOAD_ERROR]
