"""The shapes suite with a fake predictor: every task on each split, the report comparing them with its
title and generalisation-gap section from the extension."""

from __future__ import annotations

import json

import pytest
from helpers import FakePredictor
from PIL import Image

from vistune.eval.report import suite_table
from vistune.shapes.suite import generalisation_gap, run_suite


def _image(root, name, color=(255, 0, 0)):
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return name


def _shapes_dir(tmp_path, newer=True):
    """A two-split shapes world of one image each; `newer`: with relation records and multiturn.json."""
    root = tmp_path / "shapes"
    for split in ("test", "compositional"):
        img = f"{split}/0.png"
        _image(root / "images", img)
        human = {"from": "human", "value": "<image>\nWhat color is the circle?"}
        files = {
            "vqa": [
                {
                    "id": "v0",
                    "image": img,
                    "question_type": "color",
                    "answer": "red",
                    "conversations": [human, {"from": "gpt", "value": "red"}],
                }
            ],
            "captions": [
                {
                    "id": "c0",
                    "image": img,
                    "conversations": [
                        {"from": "human", "value": "<image>\nDescribe the picture."},
                        {"from": "gpt", "value": "a red circle"},
                    ],
                }
            ],
            "pope": [
                {
                    "id": "p0",
                    "image": img,
                    "answer": "yes",
                    "pope_setting": "random",
                    "object": "circle",
                    "conversations": [
                        {"from": "human", "value": "<image>\nIs there a circle?"},
                        {"from": "gpt", "value": "yes"},
                    ],
                }
            ],
            "classify": [
                {
                    "id": "k0",
                    "image": img,
                    "label": "circle",
                    "conversations": [
                        {"from": "human", "value": "<image>\nWhich shape is it?"},
                        {"from": "gpt", "value": "circle"},
                    ],
                }
            ],
        }
        files["detailed"] = [
            _record("d0", img, "Describe the image in detail.", "There is 1 object: a red circle.")
        ]
        if newer:
            files["vqa"].append(_record("r0", img, "Is there a red circle?", "yes", question_type="binding"))
            files["multiturn"] = [
                _record("m0", img, "What colour is the circle?", "red", question_type="refer_back",
                        follow=("And what size is it?", "small")),
                _record("m1", img, "What time is it?", "I can't tell that from the image.",
                        question_type="unanswerable"),
            ]  # fmt: skip
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / split / f"{name}.json").write_text(json.dumps(data))
        circle = {"color": "red", "shape": "circle", "size": "small", "x": 8.0, "y": 8.0}
        scene = {"id": f"{split}-000000", "image": img, "width": 16, "height": 16, "objects": [circle]}
        (root / "scenes").mkdir(exist_ok=True)
        (root / "scenes" / f"{split}.jsonl").write_text(json.dumps(scene) + "\n")
    (root / "manifest.json").write_text(json.dumps({"labels": ["circle", "square"]}))
    return root


def _record(rid, img, question, answer, follow=None, **extra):
    turns = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    if follow:
        turns += [{"from": "human", "value": follow[0]}, {"from": "gpt", "value": follow[1]}]
    return {"id": rid, "image": img, "answer": (follow or (None, answer))[1], "conversations": turns, **extra}


def test_run_suite_compares_splits(tmp_path):
    pred = FakePredictor(
        {"color": "red", "Describe": "a red circle", "Is there": "yes", "Which shape": "circle"}
    )
    results = run_suite(pred, _shapes_dir(tmp_path), tmp_path / "out", meteor=False, limit=10)
    assert set(results) == {"test", "compositional", "text"}
    assert (
        results["test"]["vqa"]["accuracy"] == 1.0 and results["compositional"]["classify"]["accuracy"] == 1.0
    )
    assert results["test"]["pope"]["overall"]["accuracy"] == 1.0
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| task | metric | test | compositional |" in md and "test/vqa/report.md" in md
    assert (tmp_path / "out" / "compositional" / "caption" / "grid.png").exists()
    assert "| vqa | accuracy | 1.0000 | 1.0000 |" in suite_table(results)
    assert md.startswith("# Evaluation suite: shapes world\n")
    assert "## Generalisation gap" in md and "| vqa | accuracy | 0.0000 |" in md


def test_the_suite_scores_relations_descriptions_and_follow_ups(tmp_path):
    pred = FakePredictor({"red circle?": "yes", "in detail": "I see a red circle and a blue star.",
                          "size is it": "small", "time": "I can't tell that from the image."})  # fmt: skip
    names = ("vqa", "relations", "detailed", "multiturn")
    results = run_suite(pred, _shapes_dir(tmp_path), tmp_path / "out", tasks=names, meteor=False)
    test = results["test"]
    assert test["vqa"]["n"] == 1 and set(test["vqa"]["by_question_type"]) == {"color"}  # the six types only
    assert test["relations"]["n"] == 1 and test["relations"]["by_question_type"]["binding"]["accuracy"] == 1.0
    # one object, named right; a blue star that is not there
    assert test["detailed"]["graph_recall"] == 1.0 and test["detailed"]["graph_hallucination"] == 0.5
    assert test["multiturn"]["by_question_type"] == {
        "refer_back": {"accuracy": 1.0, "n": 1}, "unanswerable": {"accuracy": 1.0, "n": 1}}  # fmt: skip
    table = suite_table(results)
    assert "| detailed | graph_recall | 1.0000 | 1.0000 |" in table and "| multiturn | accuracy |" in table
    rows = (tmp_path / "out" / "test" / "detailed" / "predictions.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["graph"]["hallucinated"] == 1
    lines = generalisation_gap(results)
    assert any(line.startswith("| relations | accuracy |") for line in lines)


def test_a_dataset_older_than_the_new_entries_scores_as_before(tmp_path):
    data = _shapes_dir(tmp_path, newer=False)
    results = run_suite(FakePredictor(), data, tmp_path / "out", meteor=False, limit=10)
    assert set(results["test"]) == {"vqa", "caption", "detailed", "pope", "classify"}
    with pytest.raises(ValueError, match="no multiturn records"):
        run_suite(FakePredictor(), data, tmp_path / "again", tasks=("multiturn",), meteor=False)


def test_the_generalisation_gap_is_test_minus_each_other_split():
    results = {
        "test": {"vqa": {"accuracy": 0.9}, "pope": {"overall": {"f1": 0.8, "accuracy": 0.7}}},
        "compositional": {"vqa": {"accuracy": 0.6}},
        "shifted": {"vqa": {"accuracy": 0.8}, "pope": {"overall": {"f1": 0.5, "accuracy": 0.7}}},
        "text": {"accuracy": 0.5},
    }
    lines = generalisation_gap(results)
    assert lines[:2] == ["## Generalisation gap", ""]
    vqa = next(line for line in lines if line.startswith("| vqa |"))
    cells = [c.strip() for c in vqa.strip("|").split("|")]
    assert cells[:2] == ["vqa", "accuracy"]
    assert [float(c) for c in cells[2:]] == pytest.approx([0.3, 0.1])
    assert generalisation_gap({"test": results["test"]}) == []  # nothing to compare with
