"""Supervised classification: scoring, linear probe and fine-tune on a tiny ImageFolder, saved weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import shape_image

from vistune.commands.classifier import main_train_classifier
from vistune.config import VisionConfig
from vistune.model.vision import build_vision_tower

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _folder(root, per_class: dict[str, int]) -> None:
    """ImageFolder of colour classes: class c holds shapes of colour c at varying sizes."""
    for split, n in per_class.items():
        for color in ("red", "blue", "green"):
            (root / split / color).mkdir(parents=True, exist_ok=True)
            for k in range(n):
                shape_image(color, ("circle", "square")[k % 2], 24 + 4 * k).save(
                    root / split / color / f"{k}.png"
                )


def test_probe_separates_colours(tmp_path):
    _folder(tmp_path / "data", {"train": 6, "val": 2, "test": 3})
    out = tmp_path / "probe"
    args = [
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--mode",
        "probe",
        "--tower",
        "clip",
        "--image-size",
        "32",
    ]
    assert main_train_classifier(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["classes"] == ["blue", "green", "red"] and report["test"]["n"] == 9
    assert report["test"]["accuracy"] >= 0.8  # colour is linearly readable even from a random ViT
    assert (out / "confusion.png").stat().st_size > 1000
    assert np.sum(report["test"]["confusion"]["matrix"]) == 9
    assert set(report["test"]["per_class"]) == {"blue", "green", "red"}


def test_finetune_resnet_learns_and_saves_reusable_weights(tmp_path):
    _folder(tmp_path / "data", {"train": 8, "val": 2, "test": 3})
    out = tmp_path / "ft"
    args = [
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--mode",
        "finetune",
        "--tower",
        "resnet",
        "--image-size",
        "32",
        "--epochs",
        "6",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
    ]
    assert main_train_classifier(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["test"]["accuracy"] >= 2 / 3  # 3 classes, chance 1/3
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("loss") is not None for r in losses) == 18  # 6 epochs of 24 images in batches of 8
    assert (out / "checkpoints").is_dir()  # the training loop's checkpoints, for --resume
    # The saved tower loads through VisionConfig.weights and matches the saved classifier's classes.
    meta = json.loads((out / "vistune.json").read_text())
    assert meta["classes"] == ["blue", "green", "red"]
    tower = build_vision_tower(
        VisionConfig(kind="resnet", image_size=32, weights=str(out / "vision.safetensors"))
    )
    fresh = build_vision_tower(VisionConfig(kind="resnet", image_size=32))
    assert not torch.allclose(
        tower.model.embedder.embedder.convolution.weight, fresh.model.embedder.embedder.convolution.weight
    )


def test_missing_split_is_named(tmp_path):
    _folder(tmp_path / "data", {"train": 1, "val": 1})
    with pytest.raises(ValueError, match="test"):
        main_train_classifier(
            ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--tower", "clip"]
        )


def test_without_val_a_share_of_train_is_held_out_and_resnet_sizes_are_flags(tmp_path):
    _folder(tmp_path / "data", {"train": 10, "test": 2})
    out = tmp_path / "ft"
    args = ["--data", str(tmp_path / "data"), "--out", str(out), "--mode", "finetune", "--tower", "resnet",
            "--resnet-depths", "1,1", "--resnet-widths", "8,16", "--image-size", "32", "--epochs", "1",
            "--batch-size", "8", "--val-share", "0.2", "--shrink", "0.3"]  # fmt: skip
    assert main_train_classifier(args) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["val"]["n"] == 6 and report["train_images"] == 24  # 2 of 10 per class held out
    meta = json.loads((out / "vistune.json").read_text())
    assert meta["vision"]["resnet_widths"] == [8, 16]


def test_one_class_and_bad_sizes_are_refused(tmp_path):
    (tmp_path / "data" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "data" / "test" / "cat").mkdir(parents=True)
    shape_image("red", "circle", 24).save(tmp_path / "data" / "train" / "cat" / "a.png")
    with pytest.raises(ValueError, match="1 class folder.*at least 2"):
        main_train_classifier(
            ["--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"), "--tower", "clip"]
        )
    with pytest.raises(SystemExit):
        main_train_classifier(["--data", str(tmp_path / "data"), "--out", str(tmp_path / "o"),
                               "--resnet-depths", "2,x"])  # fmt: skip


def test_a_classify_stage_trains_its_head_with_the_tower(one_stage, tmp_path):
    """`train: [vision]` trains the tower and the stage's own head; `projector` is refused by name."""
    from vistune.commands.train import train
    from vistune.config import config_from_dict

    raw = one_stage(["vision"], kind="classify")
    raw["out"] = str(tmp_path / "run")
    train(config_from_dict(raw))
    losses = [json.loads(x)["loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in x and json.loads(x).get("loss") is not None]  # fmt: skip
    assert losses and all(np.isfinite(losses))
    raw = one_stage(["vision", "projector"], kind="classify")
    raw["out"] = str(tmp_path / "run2")
    with pytest.raises(ValueError, match=r"use train: \[vision\]"):
        train(config_from_dict(raw))
