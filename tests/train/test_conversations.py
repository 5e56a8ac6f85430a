"""Conversation data: truncation never cuts image tokens or keeps answerless records; collate pads right;
records whose images training cannot decode are caught before training (skipped and counted, or an error)."""

from __future__ import annotations

import json
from pathlib import Path

import broken_images
import pytest
import torch
from helpers import shape_image

from vistune.config import DataSpec
from vistune.data import validate as validate_module
from vistune.data.images import load_image
from vistune.data.readers import DataError
from vistune.data.records import Turn
from vistune.model.llm import load_tokenizer
from vistune.model.template import CHATML, IGNORE, render
from vistune.train.conversations import ConversationData, Sample, _truncate, collate

IMAGE_TOKENS = 16
MAX_LENGTH = 32
# (id, user text, answer): where MAX_LENGTH falls is checked in the test against the rendered positions
RECORDS = [
    ("in-image", "Look closely at this picture, please: " * 2 + "<image>\nWhat?", "Red."),
    ("before-answer", "<image>\nPlease tell me, in as many words as you like, what colour the shape in "
     "this picture has and where it is.", "Red."),
    ("in-answer", "<image>\nWhat?", "It is a red circle in the middle of a white picture, drawn with "
     "a steady hand."),
    ("short", "<image>\nHi", "Red."),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_llm_dir):
    tok = load_tokenizer(str(tiny_llm_dir))
    tok.chat_template = CHATML
    return tok


def _render(tokenizer, user: str, answer: str):
    turns = [Turn("user", user), Turn("assistant", answer)]
    return render(turns, tokenizer, image_tokens=IMAGE_TOKENS, num_images=user.count("<image>"))


def _write(tmp_path: Path, records) -> DataSpec:
    shape_image("red", "circle").save(tmp_path / "red.png")
    raw = [
        {"id": rid, "image": "red.png", "conversations": [{"from": "human", "value": user},
                                                         {"from": "gpt", "value": answer}]}
        for rid, user, answer in records
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(raw), encoding="utf-8")
    return DataSpec(path=str(tmp_path / "data.json"))


def test_truncation_keeps_images_whole_and_needs_an_answer(tmp_path, tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    spans = {}
    for rid, user, answer in RECORDS:
        out = _render(tokenizer, user, answer)
        images = [i for i, t in enumerate(out.input_ids) if t == image_id]
        answers = [i for i, label in enumerate(out.labels) if label != IGNORE]
        spans[rid] = (len(out.input_ids), images[0], images[-1], answers[0], answers[-1])
    # the limit falls (a) inside the image run, (b) after it but before the answer, (c) inside the answer
    n, first_image, last_image, _, _ = spans["in-image"]
    assert n > MAX_LENGTH and first_image < MAX_LENGTH <= last_image
    n, _, last_image, first_answer, _ = spans["before-answer"]
    assert n > MAX_LENGTH and last_image < MAX_LENGTH <= first_answer
    n, _, last_image, first_answer, last_answer = spans["in-answer"]
    assert n > MAX_LENGTH and last_image < first_answer < MAX_LENGTH <= last_answer
    assert spans["short"][0] <= MAX_LENGTH

    data = ConversationData([_write(tmp_path, RECORDS)], tokenizer, IMAGE_TOKENS, MAX_LENGTH)
    assert data.counts == {"dropped_too_long": 2, "cut": 1, "kept": 2}
    assert [s.where.split("record ")[-1] for s in data] == ["'in-answer'", "'short'"]
    cut, short = data[0], data[1]
    full = _render(tokenizer, *RECORDS[2][1:])
    assert len(cut.input_ids) == len(cut.labels) == MAX_LENGTH
    assert cut.input_ids == full.input_ids[:MAX_LENGTH] and cut.labels == full.labels[:MAX_LENGTH]
    assert cut.input_ids.count(image_id) == IMAGE_TOKENS  # every image token survives
    assert sum(label != IGNORE for label in cut.labels[1:]) == MAX_LENGTH - first_answer >= 1
    assert cut.images == [tmp_path / "red.png"]
    assert short.input_ids == _render(tokenizer, *RECORDS[3][1:]).input_ids  # short records are untouched
    assert data.num_tokens() == MAX_LENGTH + spans["short"][0]


def test_every_record_too_long_is_an_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"no usable records.*'dropped_too_long': 2"):
        ConversationData([_write(tmp_path, RECORDS[:2])], tokenizer, IMAGE_TOKENS, MAX_LENGTH)


# ids: two text tokens, four image tokens (2..5), two question tokens, three answer tokens (8..10)
TEXT, ANSWER = [11, 12], [21, 22, 23]


def _synthetic(image_id: int) -> tuple[list[int], list[int]]:
    ids = TEXT + [image_id] * 4 + [13, 14] + ANSWER
    return ids, [IGNORE] * 8 + ANSWER


@pytest.mark.parametrize("max_length", [1, 2, 3, 4, 5, 6, 7, 8])
def test_truncate_drops_cuts_through_images_or_before_the_answer(tokenizer, max_length):
    ids, labels = _synthetic(tokenizer.convert_tokens_to_ids("<image>"))
    assert _truncate(ids, labels, max_length, tokenizer) == ([], [])


@pytest.mark.parametrize("max_length", [9, 10])
def test_truncate_cuts_inside_the_answer(tokenizer, max_length):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels = _synthetic(image_id)
    got_ids, got_labels = _truncate(ids, labels, max_length, tokenizer)
    assert got_ids == ids[:max_length] and got_labels == labels[:max_length]
    assert got_ids.count(image_id) == 4 and got_labels[8:] == ANSWER[: max_length - 8]


def test_truncate_drops_an_image_cut_even_after_an_earlier_answer(tokenizer):
    """A second-turn image cut in half is dropped, although the first answer would survive."""
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids = [11] + ANSWER + [12] + [image_id] * 4 + [24]
    labels = [IGNORE] + ANSWER + [IGNORE] * 5 + [24]
    assert _truncate(ids, labels, 7, tokenizer) == ([], [])
    assert _truncate(ids, labels, 9, tokenizer) == (ids[:9], labels[:9])  # images whole, answer kept


def test_collate_right_pads_with_pad_id_ignore_and_zero_mask():
    samples = [
        Sample([5, 6, 7], [IGNORE, 6, 7], [Path("a.png")], "x"),
        Sample([8, 9, 10, 11, 12], [IGNORE, IGNORE, 10, 11, 12], [Path("b.png"), Path("c.png")], "y"),
        Sample([13], [IGNORE], [], "z"),
    ]
    batch = collate(samples, pad_id=99)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 99, 99], [8, 9, 10, 11, 12], [13, 99, 99, 99, 99]]
    assert batch["labels"].tolist() == [
        [IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 10, 11, 12], [IGNORE] * 5
    ]  # fmt: skip
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    assert batch["images"] == [Path("a.png"), Path("b.png"), Path("c.png")]  # in sample order


def test_skip_drops_records_whose_images_training_cannot_decode(tmp_path, tokenizer, monkeypatch):
    """Issue 18: such a record used to be kept, and the run then failed when its batch loaded the image."""
    shape_image("red", "circle").save(tmp_path / "red.png")
    broken_images.cut_stream_png(tmp_path / "cut.png")
    broken_images.short_png(tmp_path / "short.png")
    images = {"a": "red.png", "b": "red.png", "cut": "cut.png", "short": "short.png"}
    raw = [
        {"id": rid, "image": image, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                      {"from": "gpt", "value": "Red."}]}
        for rid, image in images.items()
    ]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(raw), encoding="utf-8")
    spec = DataSpec(path=str(tmp_path / "data.json"))
    decoded = []
    real = validate_module.check_image
    monkeypatch.setattr(validate_module, "check_image", lambda p, m: decoded.append(p.name) or real(p, m))
    data = ConversationData([spec], tokenizer, IMAGE_TOKENS, 200, on_bad_record="skip")
    assert data.counts == {"kept": 2, "skipped_bad": 2}
    assert sorted(decoded) == ["cut.png", "red.png", "short.png"]  # each file decoded once
    for sample in data:  # what the vlm stage does when it builds the batch
        assert [load_image(p).size for p in sample.images] == [(32, 32)]
    with pytest.raises(DataError, match=r"data.json record 'cut': truncated image"):
        ConversationData([spec], tokenizer, IMAGE_TOKENS, 200)
