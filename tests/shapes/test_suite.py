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


def _shapes_dir(tmp_path):
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
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (root / split / f"{name}.json").write_text(json.dumps(data))
    (root / "manifest.json").write_text(json.dumps({"labels": ["circle", "square"]}))
    return root


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
