"""The built-in stage kinds, and how a stage's objective is looked up and built.

Built in: `vlm` (answer-token loss on conversations), `contrastive` (CLIP/SigLIP image-text
pretraining of the tower), `classify` (the tower with a linear head on an ImageFolder), and text
pretraining: `clm` (the LLM's next-token loss on raw text), `mlm`, `nsp` and `plm` (a text encoder's
masked tokens, next sentences and permutation order; docs/text.md). Extensions
add theirs through their entry point (`vistune.extensions.register_stage_kind`); `stage_kinds` joins
both. A kind also says whether DDP must look for parameters that get no gradient: a tower that learns
may hold some its features never reach (a CLIP or SigLIP tower's final layer norm, the layers above
`feature_layer`), and DDP fails at the next step unless it is told to look, which costs every step; an
encoder stage trains heads its objective does not use (the NSP head in an `mlm` stage).
"""

from __future__ import annotations

from collections.abc import Sequence

from vistune import extensions
from vistune.config import BUILT_IN_OPTIONS, Stage
from vistune.extensions import StageKindPart
from vistune.model.vlm import VLM
from vistune.train.classifier import classify_stage
from vistune.train.contrastive import contrastive_stage
from vistune.train.masked import mlm_stage, nsp_stage
from vistune.train.objective import Objective, StageContext
from vistune.train.permuted import plm_stage
from vistune.train.text import clm_stage
from vistune.train.vlm import VLMObjective


def _trains_the_tower(stage: Stage) -> bool:
    return "vision" in stage.train


def _trains_a_tower(stage: Stage) -> bool:
    """A contrastive stage's towers: the vision tower, and the text tower (`llm`)."""
    return "vision" in stage.train or "llm" in stage.train


BUILT_IN: dict[str, StageKindPart] = {
    "vlm": StageKindPart(VLMObjective, BUILT_IN_OPTIONS["vlm"], _trains_the_tower),
    "contrastive": StageKindPart(contrastive_stage, BUILT_IN_OPTIONS["contrastive"], _trains_a_tower),
    "classify": StageKindPart(classify_stage, BUILT_IN_OPTIONS["classify"], True),
    "clm": StageKindPart(clm_stage, BUILT_IN_OPTIONS["clm"], False),
    "mlm": StageKindPart(mlm_stage, BUILT_IN_OPTIONS["mlm"], True),
    "nsp": StageKindPart(nsp_stage, BUILT_IN_OPTIONS["nsp"], True),
    "plm": StageKindPart(plm_stage, BUILT_IN_OPTIONS["plm"], True),
}


def stage_kinds() -> dict[str, StageKindPart]:
    """Every stage kind: the built-in ones and those the installed extensions add."""
    extensions.load_extensions()
    clash = sorted(set(BUILT_IN) & set(extensions.STAGE_KINDS))
    if clash:
        raise ValueError(f"stage kind(s) {clash} are built in; an extension cannot take them")
    return BUILT_IN | extensions.STAGE_KINDS


def _kind(stage: Stage) -> StageKindPart:
    kinds = stage_kinds()
    if stage.kind not in kinds:
        raise ValueError(f"stage {stage.name!r}: kind {stage.kind!r} is not one of {sorted(kinds)}")
    return kinds[stage.kind]


def build_objective(stage: Stage, model: VLM, ctx: StageContext) -> Objective:
    """The objective that trains `model` for `stage`."""
    return extensions.resolve(_kind(stage).factory)(stage, model, ctx)


def needs_unused_parameters(stages: Sequence[Stage]) -> bool:
    """Whether DDP must look for parameters without gradients in a run of these stages."""
    for stage in stages:
        flag = _kind(stage).find_unused_parameters
        if flag(stage) if callable(flag) else flag:
            return True
    return False
