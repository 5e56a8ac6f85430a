"""The built-in stage kinds, and how a stage's objective is looked up and built.

Built in: `vlm` (answer-token loss on conversations), `contrastive` (CLIP/SigLIP image-text
pretraining of the tower) and `classify` (the tower with a linear head on an ImageFolder). Extensions
add kinds to the same table (`vistune.train.objective.OBJECTIVES`) through their entry point.
"""

from __future__ import annotations

from collections.abc import Sequence

from vistune.config import Stage
from vistune.extensions import load_extensions
from vistune.model.vlm import VLM
from vistune.train.classifier import classify_stage
from vistune.train.contrastive import contrastive_stage
from vistune.train.objective import OBJECTIVES, Objective, StageContext, register_objective
from vistune.train.vlm import VLMObjective

BUILT_IN = {"vlm": VLMObjective, "contrastive": contrastive_stage, "classify": classify_stage}


def check_kinds(stages: Sequence[Stage]) -> None:
    """Fail before any work if a stage names a kind that is not registered."""
    for kind, factory in BUILT_IN.items():
        register_objective(kind, factory)
    load_extensions()
    for stage in stages:
        if stage.kind not in OBJECTIVES:
            raise ValueError(f"stage {stage.name!r}: kind {stage.kind!r} is not one of {sorted(OBJECTIVES)}")


def build_objective(stage: Stage, model: VLM, ctx: StageContext) -> Objective:
    """The objective that trains `model` for `stage`."""
    check_kinds([stage])
    return OBJECTIVES[stage.kind](stage, model, ctx)
