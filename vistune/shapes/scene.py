"""The `scene` stage kind: pretrain the vision tower to read a scene graph, without running the LLM.

Each output token of the tower covers one cell of its (h, w) grid; the token must name the colour,
shape and size of the object whose centre lies in its cell, or "empty", and say where the nearest
object centre is (an "offset" regressor, as in CenterNet, here also trained on the neighbouring cells).
This dense, cheap objective teaches a from-scratch tower what the later stages ask about (attributes,
counts, positions) in a fraction of the time that learning it through a frozen LLM takes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from vistune.config import Augment, Stage, StageOptions
from vistune.data.augment import augment, mirror_grid
from vistune.data.images import load_image
from vistune.model.vlm import VLM
from vistune.shapes.questions import COLORS, SHAPES, SIZES
from vistune.shapes.scenes import load_scenes
from vistune.shapes.words import ObjectWords, VisualWords
from vistune.train.objective import Batcher, StageContext, move_to, pixel_fn

ATTRIBUTES = {"color": COLORS, "shape": SHAPES, "size": SIZES}
# Most cells are empty; without weighting, "empty" dominates the loss and the attributes of the few
# object cells (what every question is about) are learned slowly.
OBJECT_WEIGHT = 10.0
OFFSET_WEIGHT = 10.0  # L1 on the position of the nearest object centre, in cell sides


@dataclass
class SceneOptions(StageOptions):
    """`scene` stages: train-time image augmentation that keeps the cell targets true (default: none)."""

    augment: Augment = field(default_factory=Augment)

    def __post_init__(self) -> None:
        if isinstance(self.augment, dict):
            self.augment = Augment(**self.augment)
        if self.augment.shrink:
            raise ValueError(
                "augment.shrink moves objects off their cells; a scene stage's targets are tied to places "
                "(use it in classify stages)"
            )


def _cell(obj: dict, scene: dict, grid: tuple[int, int]) -> tuple[int, int, float, float]:
    """(row, column) of the cell holding an object's centre, and the centre's x, y inside it (0..1)."""
    h, w = grid
    fx, fy = obj["x"] / scene["width"] * w, obj["y"] / scene["height"] * h
    row, col = min(int(fy), h - 1), min(int(fx), w - 1)
    return row, col, min(fx - col, 1.0), min(fy - row, 1.0)


def cell_targets(scene: dict, grid: tuple[int, int]) -> torch.Tensor:
    """(h*w, 3) class ids per cell for colour, shape, size; 0 means no object centre in the cell."""
    h, w = grid
    targets = torch.zeros(h * w, len(ATTRIBUTES), dtype=torch.long)
    for obj in scene["objects"]:
        row, col, _, _ = _cell(obj, scene, grid)
        for k, (name, vocab) in enumerate(ATTRIBUTES.items()):
            targets[row * w + col, k] = vocab.index(obj[name]) + 1
    return targets


def cell_offsets(scene: dict, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the nearest object centre is, seen from each cell next to it: (h*w, 2) x, y in cell units
    relative to the cell's corner (0..1 inside the cell, -1..2 from a neighbour), and an (h*w,) mask of
    the cells that have an object centre in their 3x3 neighbourhood. Neighbours learn it too, so two
    cells that both respond to one object agree on where it is (and are read as one object)."""
    h, w = grid
    offsets, best = torch.zeros(h * w, 2), torch.full((h * w,), float("inf"))
    for obj in scene["objects"]:
        row, col, dx, dy = _cell(obj, scene, grid)
        cx, cy = col + dx, row + dy
        for r in range(max(row - 1, 0), min(row + 2, h)):
            for c in range(max(col - 1, 0), min(col + 2, w)):
                distance = (cx - c - 0.5) ** 2 + (cy - r - 0.5) ** 2
                if distance < best[r * w + c]:
                    best[r * w + c] = distance
                    offsets[r * w + c] = torch.tensor([cx - c, cy - r])
    return offsets, best < float("inf")


def mirror_targets(
    targets: torch.Tensor,
    offsets: torch.Tensor,
    near: torch.Tensor,
    grid: tuple[int, int],
    flipped: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's cell targets, offsets and near-masks for images flipped left to right (`flipped`)."""
    targets, offsets, near = (mirror_grid(t, grid, flipped) for t in (targets, offsets, near))
    # a centre x cell sides right of its cell's left edge lies 1 - x right of the mirrored cell's edge
    mirrored = offsets * offsets.new_tensor([-1.0, 1.0]) + offsets.new_tensor([1.0, 0.0])
    return targets, torch.where(flipped[:, None, None], mirrored, offsets), near


def _weights(targets: torch.Tensor) -> torch.Tensor:
    """(B, h*w) loss weight per cell: OBJECT_WEIGHT where an object's centre lies, 1 elsewhere."""
    return 1.0 + (OBJECT_WEIGHT - 1.0) * (targets[..., 0] > 0).float()


def scene_batch(items: list[tuple], pixels: Callable[[list[Any]], torch.Tensor], indices: list[int]) -> dict:
    """The scene objective's host part: pixels, per-cell targets, offsets and near-masks (CPU tensors)."""
    paths, targets, offsets, near = zip(*(items[i] for i in indices), strict=True)
    return {
        "pixel_values": pixels([load_image(p) for p in paths]),
        "targets": torch.stack(targets),
        "offsets": torch.stack(offsets),
        "near": torch.stack(near),
    }


class SceneObjective(nn.Module):
    """Per-cell attribute classification on the tower's patch tokens (heads are dropped afterwards)."""

    def __init__(self, stage: Stage, model: VLM, ctx: StageContext):
        super().__init__()
        if model.vision.grid is None:
            raise ValueError(f"stage {stage.name!r}: the scene objective needs a tower with a token grid")
        if any(d.where for d in stage.data):
            raise ValueError(f"stage {stage.name!r}: `where` filters records; scene files have none")
        self.model, self.device, self.grid = model, ctx.device, model.vision.grid
        self.augment = stage.options.augment
        model.vision.train()  # BatchNorm learns its statistics here
        dim = model.vision.hidden_size
        self.heads = nn.ModuleDict(
            {name: nn.Linear(dim, len(vocab) + 1) for name, vocab in ATTRIBUTES.items()}
        )
        self.heads["offset"] = nn.Linear(dim, 2)
        self.items = []
        for spec in stage.data:
            root = Path(spec.image_root or Path(spec.path).parent)
            scenes = load_scenes(spec.path)[: spec.limit]
            self.items += [
                (root / s["image"], cell_targets(s, self.grid), *cell_offsets(s, self.grid)) for s in scenes
            ]
        if "vision" not in stage.train:
            raise ValueError(f"stage {stage.name!r}: a scene stage must train the vision tower")
        self.heads.to(ctx.device)

    def __len__(self) -> int:
        return len(self.items)

    def lengths(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"scenes": len(self.items), "grid": list(self.grid)}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """The tower and the heads learn together, at the vision learning rate."""
        return {"vision": [*self.model.vision.parameters(), *self.heads.parameters()]}

    def batcher(self) -> Batcher:
        return functools.partial(scene_batch, self.items, pixel_fn(self.model.vision))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def count(self, batch: dict[str, Any]) -> int:
        return batch["targets"].numel()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        h, w = self.grid
        pixels, targets, offsets, near = (batch[k] for k in ("pixel_values", "targets", "offsets", "near"))
        colour_weight = shape_weight = torch.ones(pixels.shape[0], 1, device=pixels.device)
        if self.training and self.augment.active():
            pixels, drawn = augment(pixels, self.augment, self.model.vision.mean, self.model.vision.std)
            targets, offsets, near = mirror_targets(targets, offsets, near, self.grid, drawn.flipped)
            colour_weight = (~drawn.grey).float()[:, None]  # a grey copy's colours cannot be known
            shape_weight = (~drawn.blurred).float()[:, None]  # nor a blurred copy's shapes
        feats = self.model.vision(pixels)[:, -h * w :]  # (B, h*w, D), CLS dropped
        weights = _weights(targets)
        loss = feats.new_zeros(())
        for k, name in enumerate(ATTRIBUTES):
            logits = self.heads[name](feats)  # (B, h*w, classes)
            ce = F.cross_entropy(logits.flatten(0, 1), targets[..., k].flatten(), reduction="none")
            cell_weights = weights * {"color": colour_weight, "shape": shape_weight}.get(name, 1.0)
            loss = loss + (ce * cell_weights.flatten()).sum()
        # Where the nearest object's centre lies: what positions ("left of", "above") are read from.
        error = (self.heads["offset"](feats) - offsets).abs() * near[..., None]
        return loss + OFFSET_WEIGHT * error.sum()

    def health(self) -> tuple[dict[str, float], str | None]:
        return {}, None

    def finish(self) -> None:
        """Hand the trained heads to a word projector, which starts its classifiers from them."""
        if isinstance(self.model.projector, (VisualWords, ObjectWords)):
            self.model.projector.init_classifiers(dict(self.heads.items()), ATTRIBUTES)
