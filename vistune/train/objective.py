"""What a training stage optimises: the `Objective` protocol that the one training loop drives.

Stage kinds are a table from a stage's `kind` to the factory that builds its objective, its options
and whether DDP must look for unused parameters: the built-in ones are in `vistune.train.kinds`,
extensions add theirs with `vistune.extensions.register_stage_kind`.

An objective is an nn.Module holding a stage's data, its loss and every module that the stage's
checkpoints must restore (the run's model, plus heads of its own). The loop (`vistune.train.loop`)
asks it for micro-batches by dataset index (a pure function of the step, which makes resume exact),
sums `forward(batch)` over the effective batch and divides by the summed `count`s, so gradient
accumulation and the number of processes do not change what is learned.

A micro-batch is made in two parts: the objective's `batcher` builds it on the host from dataset
indices (CPU tensors; it holds the stage's data and never the model, so DataLoader worker processes
can run it), and `to_device` moves it to the stage's device in the training process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from vistune.config import Stage
from vistune.model.preprocess import preprocess
from vistune.model.vision import VisionTower
from vistune.model.vlm import VLM


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs: its device, the run dir, whether this is the main process, and the run's seed."""

    device: torch.device
    run_dir: Path
    is_main: bool = True
    seed: int = 0


def stage_output(name: str, run_dir: Path) -> str:
    """`stage:NAME` as the directory where this run's stage NAME wrote its model (OUT/stages/NAME: a
    contrastive stage's image-text model, an encoder stage's encoder); any other name as it is."""
    if not name.startswith("stage:"):
        return name
    path = Path(run_dir) / "stages" / name.removeprefix("stage:")
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name}: nothing written at {path}; the stage {name.removeprefix('stage:')!r} must come "
            "earlier in this run (an mlm, nsp, plm or contrastive stage)"
        )
    return str(path)


class Batcher(Protocol):
    """The host part of an objective: a micro-batch of CPU tensors from dataset indices.

    It holds the stage's data and what building a batch needs, never the model: it runs in DataLoader
    worker processes (forked, or pickled where processes are spawned)."""

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        """The micro-batch of these dataset indices, on the host."""
        ...


class Objective(Protocol):
    """A stage's data and loss; implementations are nn.Modules."""

    def __len__(self) -> int:
        """Examples in the stage's data (what an epoch covers)."""
        ...

    def lengths(self) -> Sequence[int] | None:
        """Per-example lengths for `group_by_length`, or None where length does not matter."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the data holds (counts of kept/skipped records, ...), logged when the stage starts."""
        ...

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """The parameter sets a stage's `train` list chooses from (vision, projector, llm, lora)."""
        ...

    def batcher(self) -> Batcher:
        """The host part that builds micro-batches. One that remembers what it has built (the vlm
        batcher: which images' pixels it has sent) is the same object on every call."""
        ...

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """A host micro-batch of `batcher` on the stage's device (in the training process)."""
        ...

    def count(self, batch: dict[str, Any]) -> int:
        """Loss targets in a micro-batch (answer tokens, cells, pairs, images): the normaliser."""
        ...

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of a micro-batch summed over its targets (nn.Module.forward)."""
        ...

    def health(self) -> tuple[dict[str, float], str | None]:
        """Figures about the model's state since the last call (read back from the device: the loop
        asks at log steps only) for the log, and a warning to show once, or None."""
        ...

    def finish(self) -> None:
        """Once at the stage's end, before its last checkpoint (merge adapters, hand heads on, ...)."""
        ...


ObjectiveFactory = Callable[[Stage, VLM, StageContext], Objective]


def build_batch(objective: Objective, indices: list[int]) -> dict[str, Any]:
    """Both parts of a micro-batch in this process: `to_device(batcher()(indices))`, on the stage's
    device (for tests and benchmarks; the loop builds the host part ahead of time)."""
    return objective.to_device(objective.batcher()(indices))


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A host batch with every tensor (also inside nested dicts) on `device`; other values as they are.

    On CUDA the copy goes through pinned memory (a DataLoader with `pin_memory` has pinned it already),
    so it does not wait for the work queued before it."""
    device = torch.device(device)

    def move(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: move(v) for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            return value
        if device.type == "cuda":
            return (value if value.is_pinned() else value.pin_memory()).to(device, non_blocking=True)
        return value.to(device)

    return move(batch)


def pixel_fn(tower: VisionTower) -> Callable[[list[Image.Image]], torch.Tensor]:
    """`tower.preprocess` as a function of the tower's settings only: a batcher that holds it holds no
    weights (a bound method would carry the whole tower into each worker process)."""
    cfg = tower.config
    return functools.partial(
        preprocess, mode=cfg.preprocess, size=tower.image_size, mean=tower.mean, std=tower.std
    )
