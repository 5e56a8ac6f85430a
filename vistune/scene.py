"""The `scene` stage: pretrain the vision tower to read a scene graph, without running the LLM.

Each output token of the tower covers one cell of its (h, w) grid; the token must name the colour,
shape and size of the object whose centre lies in its cell, or "empty". This dense, cheap objective
teaches a from-scratch tower what the later stages ask about (attributes, counts, positions) in a
fraction of the time that learning it through a frozen LLM takes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vistune.config import Stage
from vistune.data.images import load_image
from vistune.data.questions import COLORS, SHAPES, SIZES
from vistune.data.synth import load_scenes
from vistune.model import VLM

ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
# Most cells are empty; without weighting, "empty" dominates the loss and the attributes of the few
# object cells (what every question is about) are learned slowly.
OBJECT_WEIGHT = 10.0


def cell_targets(scene: dict, grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 3) class ids per cell for colour, shape, size; 0 means no object centre in the cell."""
    h, w = grid
    targets = torch.zeros(h * w, len(ATTRIBUTES), dtype=torch.long)
    for obj in scene["objects"]:
        row = min(int(obj["y"] / scene["height"] * h), h - 1)
        col = min(int(obj["x"] / scene["width"] * w), w - 1)
        for k, (name, vocab) in enumerate(ATTRIBUTES.items()):
            targets[row * w + col, k] = vocab.index(obj[name]) + 1
    return targets


def _weights(targets: torch.Tensor) -> torch.Tensor:
    """(B, h*w) loss weight per cell: OBJECT_WEIGHT where an object's centre lies, 1 elsewhere."""
    return 1.0 + (OBJECT_WEIGHT - 1.0) * (targets[..., 0] > 0).float()


class SceneTask(nn.Module):
    """Per-cell attribute classification on the tower's patch tokens (heads are dropped afterwards)."""

    def __init__(self, stage: Stage, model: VLM, device: torch.device):
        super().__init__()
        if model.vision.grid is None:
            raise ValueError(f"stage {stage.name!r}: the scene objective needs a tower with a token grid")
        self.model, self.device, self.grid = model, device, model.vision.grid
        self.heads = nn.ModuleDict(
            {name: nn.Linear(model.vision.hidden_size, len(vocab) + 1) for name, vocab in ATTRIBUTES.items()}
        )
        self.items = []
        for spec in stage.data:
            root = Path(spec.image_root or Path(spec.path).parent)
            scenes = load_scenes(spec.path)[: spec.limit]
            self.items += [(root / s["image"], cell_targets(s, self.grid)) for s in scenes]
        if "vision" not in stage.train:
            raise ValueError(f"stage {stage.name!r}: a scene stage must train the vision tower")
        self.heads.to(device)

    def __len__(self) -> int:
        return len(self.items)

    def describe(self) -> dict:
        return {"scenes": len(self.items), "grid": list(self.grid)}

    def batch(self, indices: list[int]) -> dict:
        paths, targets = zip(*(self.items[i] for i in indices), strict=True)
        pixels = self.model.vision.preprocess([load_image(p) for p in paths])
        return {"pixel_values": pixels.to(self.device), "targets": torch.stack(targets).to(self.device)}

    def count(self, batch: dict) -> int:
        return batch["targets"].numel()

    def forward(self, batch: dict) -> torch.Tensor:
        h, w = self.grid
        feats = self.model.vision(batch["pixel_values"])[:, -h * w :]  # (B, h*w, D), CLS dropped
        loss = feats.new_zeros(())
        for k, head in enumerate(self.heads.values()):
            logits = head(feats)  # (B, h*w, classes)
            loss = loss + F.cross_entropy(
                logits.flatten(0, 1), batch["targets"][..., k].flatten(), reduction="sum"
            )
        return loss

    def parameters_to_train(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def finish(self) -> None:
        """Hand the trained classifiers to a projector that can start from them (visual_words)."""
        if hasattr(self.model.projector, "init_classifiers"):
            self.model.projector.init_classifiers(dict(self.heads.items()), ATTRIBUTES)
