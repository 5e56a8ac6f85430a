"""`vistune data digits`: scikit-learn's handwriting as images, conversations and VQA, right by rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vistune.data.digits import KINDS, answer, kinds_for, load_split_digits, write_digits
from vistune.data.readers import load_records


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "data"
    return out, write_digits(out, train_pairs=40, test_pairs=24, seed=3)


def test_answers_by_construction():
    assert [answer(k, (6,)) for k in ("digit", "parity")] == ["6", "even"]
    assert [answer(k, (3, 8)) for k in ("left", "right", "larger", "sum")] == ["3", "8", "right", "11"]
    assert answer("larger", (9, 2)) == "left"
    assert "larger" not in kinds_for((4, 4))  # never asked of equal digits
    with pytest.raises(ValueError, match="equal"):
        answer("larger", (4, 4))


def test_layout_counts_and_splits_by_writer_half(digits):
    out, manifest = digits
    split = load_split_digits()
    assert len(split["train"][1]) == 898 and len(split["test"][1]) == 899  # scikit-learn's own halves
    assert manifest["counts"]["train"]["pairs"] == 40
    assert sorted(p.name for p in (out / "imagefolder" / "train").iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (out / "imagefolder" / "test").rglob("*.png")) == 899
    assert Image.open(out / "images/train/train-pair-00000.png").size == (128, 64)
    assert Image.open(out / "images/test/test-single-0000.png").size == (64, 64)


def test_every_record_reads_and_its_answers_follow_from_its_digits(digits):
    out, _ = digits
    records = load_records(out / "train" / "conversations.json")
    assert len(records) == 898 + 40
    for record in records:
        digits_shown = tuple(record.meta["digits"])
        for question, reply in zip(record.turns[::2], record.turns[1::2], strict=True):
            kind = next(k for k in KINDS if question.content.replace("<image>\n", "") in _templates(k))
            assert reply.content == answer(kind, digits_shown)
    vqa = json.loads((out / "test" / "vqa.json").read_text())
    assert {r["question_type"] for r in vqa} == set(KINDS)
    assert all(r["answer"] == answer(r["question_type"], tuple(r["digits"])) for r in vqa)


def test_pair_images_hold_their_digits_left_and_right(digits):
    """A pair's halves are exactly the single digits drawn alone (the same pixels)."""
    out, _ = digits
    from vistune.data.digits import draw

    inks, labels = load_split_digits()["test"]
    pair = np.asarray(Image.open(out / "images/test/test-pair-00000.png"))
    record = next(r for r in json.loads((out / "test/vqa.json").read_text()) if "pair-00000" in r["image"])
    left = [np.array_equal(pair[:, :64], np.asarray(draw(ink))) for ink in inks]
    assert labels[left.index(True)] == record["digits"][0]


def test_out_must_be_new_empty_or_a_previous_digits_dataset(digits, tmp_path):
    out, _ = digits
    write_digits(out, train_pairs=1, test_pairs=1)  # a previous output is replaced whole
    assert json.loads((out / "manifest.json").read_text())["counts"]["train"]["pairs"] == 1
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a digits dataset"):
        write_digits(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="at least 0"):
        write_digits(tmp_path / "new", train_pairs=-1)


def _templates(kind: str) -> tuple[str, ...]:
    from vistune.data.digits import TEMPLATES

    return TEMPLATES[kind]
