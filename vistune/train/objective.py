"""What a training stage optimises: the `Objective` protocol that the one training loop drives.

Stage kinds are a table from a stage's `kind` to the factory that builds its objective: the built-in
ones are in `vistune.train.kinds`, extensions add theirs here with `register_objective` (the shapes
world adds `scene`).

An objective is an nn.Module holding a stage's data, its loss and every module that the stage's
checkpoints must restore (the run's model, plus heads of its own). The loop (`vistune.train.loop`)
asks it for micro-batches by dataset index (a pure function of the step, which makes resume exact),
sums `forward(batch)` over the effective batch and divides by the summed `count`s, so gradient
accumulation and the number of processes do not change what is learned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from vistune.config import Stage
from vistune.model.vlm import VLM


@dataclass(frozen=True)
class StageContext:
    """Where a stage runs: its device, the run dir, and whether this is the main process."""

    device: torch.device
    run_dir: Path
    is_main: bool = True


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

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The micro-batch of these dataset indices, on the stage's device."""
        ...

    def count(self, batch: dict[str, Any]) -> int:
        """Loss targets in a micro-batch (answer tokens, cells, pairs, images): the normaliser."""
        ...

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        """The loss of a micro-batch summed over its targets (nn.Module.forward)."""
        ...

    def finish(self) -> None:
        """Once at the stage's end, before its last checkpoint (merge adapters, hand heads on, ...)."""
        ...


ObjectiveFactory = Callable[[Stage, VLM, StageContext], Objective]
OBJECTIVES: dict[str, ObjectiveFactory] = {}  # the kinds extensions add


def register_objective(kind: str, factory: ObjectiveFactory) -> None:
    """Add a stage kind; a kind cannot be taken twice by different factories."""
    if OBJECTIVES.get(kind, factory) is not factory:
        raise ValueError(f"stage kind {kind!r} is already registered")
    OBJECTIVES[kind] = factory
