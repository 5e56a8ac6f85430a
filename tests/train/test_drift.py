"""Watching the image tokens and a learning tower: the figures each log line carries, and one warning."""

from __future__ import annotations

import json

import torch
from torch import nn

from vistune.commands.train import train
from vistune.config import config_from_dict
from vistune.train.drift import ImageDrift


def test_token_norms_are_read_against_the_words_and_warn_once_when_they_grow():
    words = torch.ones(5, 4)  # each word has norm 2
    drift = ImageDrift(words, tower=None)
    drift.add(torch.ones(2, 3, 4))  # norm 2
    figures, warning = drift.read()
    assert figures == {"image_token_norm": 2.0, "word_norm": 2.0} and warning is None
    assert drift.read() == ({}, None)  # nothing new since the last read
    drift.add(torch.full((1, 3, 4), 5.0))  # norm 10: five times where it started
    figures, warning = drift.read()
    assert figures["image_token_norm"] == 10.0 and "5.0x the 2.00 they started at" in warning
    drift.add(torch.full((1, 3, 4), 5.0))
    assert drift.read()[1] is None  # once per stage


def test_a_learning_tower_is_followed_on_its_first_images():
    tower = nn.Sequential(nn.Flatten(2), nn.Linear(4, 6))  # (B, 3, 2, 2) -> (B, 3, 6): 3 "tokens"
    drift = ImageDrift(torch.ones(5, 4), tower)
    pixels = torch.randn(10, 3, 2, 2)
    drift.add(torch.ones(10, 3, 4), pixels)
    assert drift.probe[0].shape[0] == 8  # the first batch's first images
    assert drift.read()[0]["tower_similarity"] == 1.0
    with torch.no_grad():
        tower[1].weight.add_(torch.randn_like(tower[1].weight) * 3)  # the tower learned a lot
    drift.add(torch.ones(1, 3, 4))
    figures, warning = drift.read()
    assert figures["tower_similarity"] < 0.9 and "tower's features moved" in warning


def test_a_vlm_stage_logs_the_figures(one_stage, tmp_path):
    raw = one_stage(["vision", "projector"]) | {"out": str(tmp_path / "run")}
    raw["log_every"] = 1
    train(config_from_dict(raw))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "step" in r]
    assert all({"image_token_norm", "word_norm", "tower_similarity"} <= set(r) for r in steps)
