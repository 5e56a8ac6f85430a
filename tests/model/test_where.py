"""Telling left from right through the general path: what position codes add, learned in seconds.

A tower whose features say nothing of where they are (a CNN's, away from the image's edges) gives the
same token for a thing wherever it stands. Through `mlp2x_gelu` the LLM must then find a token's place
from its order in the sequence; pooled as a set (the resampler), an image and its mirror even give the
same image tokens. With each token's grid row and column appended (`position_codes`) a tiny model learns
"which colour is on the left?" in 150 steps.
"""

from __future__ import annotations

import torch

from vistune.data.records import Turn
from vistune.model.template import IGNORE, render
from vistune.model.vlm import VLM, build_vlm

COLOURS = ("red", "green", "blue", "yellow")
GRID = (2, 2)  # the tiny ResNet's grid
STEPS = 150


def _features(left: int, right: int, dim: int) -> torch.Tensor:
    """(4, dim) tokens of a 2x2 grid whose left column shows colour `left` and right column `right`:
    each token is its colour's vector, the same wherever it stands."""
    table = torch.eye(len(COLOURS), dim) * 3.0
    return torch.stack([table[left], table[right], table[left], table[right]])


def _examples(model: VLM) -> tuple[dict, torch.Tensor]:
    """Every (left colour, right colour, asked side) as one right-padded batch, and its tokens' features."""
    rows, features = [], []
    for left in range(len(COLOURS)):
        for right in range(len(COLOURS)):
            if left == right:
                continue
            for side in ("left", "right"):
                answer = COLOURS[left if side == "left" else right]
                turns = [Turn("user", f"<image>\nWhich colour is on the {side}?"), Turn("assistant", answer)]
                rows.append(render(turns, model.tokenizer, image_tokens=model.image_tokens, num_images=1))
                features.append(_features(left, right, model.vision.hidden_size))
    width = max(len(r.input_ids) for r in rows)
    pad = model.tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids))
                                        for r in rows]),  # fmt: skip
        "labels": torch.tensor([r.labels + [IGNORE] * (width - len(r.labels)) for r in rows]),
    }
    return batch, torch.stack(features)


def _train_and_score(model: VLM, steps: int) -> float:
    """Train the projector and the tiny LLM on every example at every step; the share whose answer's
    first token is the most likely one."""
    batch, features = _examples(model)
    optimizer = torch.optim.Adam([*model.projector.parameters(), *model.llm.parameters()], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss_sum(**batch, vision_features=features).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], vision_features=features)
        logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"]
    first = (labels != IGNORE).int().argmax(1)  # each row's first answer token
    rows = torch.arange(len(labels))
    guesses = logits[rows, first - 1].argmax(-1)  # position t - 1 predicts token t
    return float((guesses == labels[rows, first]).float().mean())


def test_position_codes_teach_left_and_right_in_seconds(tiny_model_config):
    """mlp2x_gelu over position-free tokens: with codes every seed learns it; without, the LLM must find
    a token's place from its order in the sequence, and mostly does not in the same steps."""
    scores = {0: [], 8: []}
    for codes, seed in ((0, 0), (0, 1), (8, 0), (8, 1)):
        cfg = tiny_model_config("resnet", "mlp2x_gelu")
        cfg.projector.position_codes = codes
        torch.manual_seed(seed)
        model = build_vlm(cfg)
        assert model.vision.grid == GRID
        scores[codes].append(_train_and_score(model, STEPS))
    assert min(scores[8]) >= 0.9, scores
    assert sum(scores[0]) / 2 <= 0.75, scores


def test_a_set_pooling_projector_cannot_tell_an_image_from_its_mirror_without_codes(tiny_model_config):
    """The resampler pools tokens as a set: an image and its mirror give the same image tokens, so "which
    colour is on the left?" gets one answer for both (chance); with codes they differ."""
    for codes in (0, 8):
        cfg = tiny_model_config("resnet", "resampler")
        cfg.projector.position_codes = codes
        torch.manual_seed(0)
        model = build_vlm(cfg).eval()
        dim = model.vision.hidden_size
        with torch.no_grad():
            a, b = (model.project(_features(*pair, dim)[None]) for pair in ((0, 1), (1, 0)))
        assert torch.allclose(a, b, atol=1e-5) == (codes == 0)
