"""The `classify` stage kind: a vision tower with a linear head, trained with cross-entropy on an
ImageFolder (class sub-folders of images).

In a run's config, a `classify` stage trains the VLM's own tower this way and drops the head afterwards;
`vistune classifier --mode finetune` (`vistune.commands.classifier`) trains a standalone classifier
with the same objective.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vistune.config import Augment, Stage
from vistune.data.augment import augment
from vistune.data.images import load_image
from vistune.data.readers import load_records
from vistune.data.validate import ensure_valid
from vistune.model.classifier import Classifier
from vistune.model.vlm import VLM
from vistune.train.objective import Batcher, StageContext, move_to, pixel_fn


class FolderData(torch.utils.data.Dataset):
    """(pixels, class index) for every image of one ImageFolder split, classes fixed by the caller.

    Every image is checked as training loads it: a bad one stops (`on_bad` "raise", naming it) or is
    skipped and counted in `skipped` ("skip")."""

    def __init__(
        self, root: Path, classes: list[str], preprocess: Any, limit: int | None = None, on_bad: str = "raise"
    ) -> None:
        records = load_records(root)
        unknown = sorted(set(records.classes) - set(classes))
        if unknown:
            raise ValueError(
                f"{root}: class folder(s) {unknown} are not among the training classes {classes}"
            )
        chosen = _spread(records, limit) if limit and len(records) > limit else list(records)
        cache: dict = {}
        self.records = [r for r in chosen if ensure_valid(r, root, on_bad=on_bad, cache=cache)]
        self.skipped = len(chosen) - len(self.records)
        self.root, self.classes, self.preprocess = root, classes, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def split(self, share: float) -> tuple[FolderData, FolderData]:
        """(kept, held out): the last `share` of each class's images (at least one) held out."""
        if not 0 < share < 1:
            raise ValueError(f"the held-out share must be between 0 and 1, got {share}")
        by_class: dict[str, list] = {}
        for record in self.records:
            by_class.setdefault(record.meta["label"], []).append(record)
        held = [r for rs in by_class.values() if len(rs) > 1 for r in rs[-max(1, round(share * len(rs))) :]]
        if not held:
            raise ValueError(f"{self.root}: too few images to hold out a validation share; add a val/ folder")
        ids = {id(r) for r in held}
        kept, out = copy.copy(self), copy.copy(self)
        kept.records, out.records = [r for r in self.records if id(r) not in ids], held
        return kept, out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        image = load_image(self.root / record.images[0])
        return self.preprocess([image])[0], self.classes.index(record.meta["label"])


def _spread(records: Any, limit: int) -> list:
    """`limit` records spread evenly over the (class-sorted) list, so every class keeps some."""
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, limit).round()]


def folder_classes(root: Path) -> list[str]:
    """The class names of an ImageFolder (its sub-folders); at least two, or nothing can be learned."""
    classes = load_records(root).classes
    if len(classes) < 2:
        raise ValueError(f"{root}: {len(classes)} class folder(s) {classes}; a classifier needs at least 2")
    return classes


def folder_batch(data: FolderData, indices: list[int]) -> dict[str, Any]:
    """The classify objective's host part: (B, 3, H, W) pixels and (B,) class indices."""
    pixels, labels = zip(*(data[i] for i in indices), strict=True)
    return {"pixels": torch.stack(pixels), "labels": torch.tensor(labels)}


class ClassifierObjective(nn.Module):
    """Summed cross-entropy of a classifier on an ImageFolder split.

    `holds` is any other module a mid-stage checkpoint must restore (the run's VLM, whose tower this trains).
    `augment` applies to every image as it is drawn; it must keep the class true (a flip of a digit may not).
    """

    def __init__(
        self,
        model: Classifier,
        data: FolderData,
        device: torch.device,
        holds: nn.Module | None = None,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        self.model, self.data, self.device, self.holds = model.to(device), data, device, holds
        self.augment = augment or Augment()
        model.train()  # the tower and head learn: BatchNorm in training mode

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.data), "skipped_bad": self.data.skipped, "classes": self.data.classes}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """`vision`: the tower, and the head that scores it (new, dropped afterwards: it always learns)."""
        return {"vision": [*self.model.tower.parameters(), *self.model.head.parameters()]}

    def batcher(self) -> Batcher:
        return functools.partial(folder_batch, self.data)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        pixels = batch["pixels"]
        if self.training and self.augment.active():
            tower = self.model.tower
            pixels, _ = augment(pixels, self.augment, tower.mean, tower.std)  # a class holds in any view
        return F.cross_entropy(self.model(pixels), batch["labels"], reduction="sum")

    def health(self) -> tuple[dict[str, float], str | None]:
        return {}, None

    def finish(self) -> None:
        """Nothing to hand on: the tower keeps what it learned, the head is dropped with the objective."""


def classify_stage(stage: Stage, model: VLM, ctx: StageContext) -> ClassifierObjective:
    """A run's `classify` stage: the VLM's tower with a new linear head on one ImageFolder."""
    if "projector" in stage.train:  # before, the head was the stage's `projector`
        raise ValueError(
            f"stage {stage.name!r}: a classify stage trains the tower with a head of its own, which "
            "always learns with it; the model's projector takes no part: use train: [vision]"
        )
    if len(stage.data) != 1 or not Path(stage.data[0].path).is_dir():
        raise ValueError(
            f"stage {stage.name!r}: a classify stage reads one ImageFolder directory as its data"
        )
    root = Path(stage.data[0].path)
    classes = folder_classes(root)
    data = FolderData(root, classes, pixel_fn(model.vision), stage.data[0].limit, stage.on_bad_record)
    return ClassifierObjective(
        Classifier(model.vision, len(classes)), data, ctx.device, holds=model, augment=stage.options.augment
    )
