"""The built-in stage kinds, and how a stage's objective is looked up and built.

Built in: `vlm` (answer-token loss on conversations), `contrastive` (CLIP/SigLIP image-text
pretraining of the tower) and `classify` (the tower with a linear head on an ImageFolder). Extensions
add theirs to `vistune.train.objective.OBJECTIVES` through their entry point; `stage_kinds` joins both.
"""

from __future__ import annotations

from collections.abc import Sequence

from vistune.config import Stage
from vistune.extensions import load_extensions
from vistune.model.vlm import VLM
from vistune.train.classifier import classify_stage
from vistune.train.contrastive import contrastive_stage
from vistune.train.objective import OBJECTIVES, Objective, ObjectiveFactory, StageContext
from vistune.train.vlm import VLMObjective

BUILT_IN: dict[str, ObjectiveFactory] = {
    "vlm": VLMObjective,
    "contrastive": contrastive_stage,
    "classify": classify_stage,
}


def stage_kinds() -> dict[str, ObjectiveFactory]:
    """Every stage kind: the built-in ones and those the installed extensions add."""
    load_extensions()
    clash = sorted(set(BUILT_IN) & set(OBJECTIVES))
    if clash:
        raise ValueError(f"stage kind(s) {clash} are built in; an extension cannot take them")
    return BUILT_IN | OBJECTIVES


def check_kinds(stages: Sequence[Stage]) -> None:
    """Fail before any work if a stage names a kind that is not registered."""
    kinds = stage_kinds()
    for stage in stages:
        if stage.kind not in kinds:
            raise ValueError(f"stage {stage.name!r}: kind {stage.kind!r} is not one of {sorted(kinds)}")


def build_objective(stage: Stage, model: VLM, ctx: StageContext) -> Objective:
    """The objective that trains `model` for `stage`."""
    check_kinds([stage])
    return stage_kinds()[stage.kind](stage, model, ctx)
