"""The table of stage kinds: built-in and extension kinds, and which runs ask DDP to look for parameters
that get no gradient (a cost every step, so only where a kind's loss can leave some out)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vision

from vistune.config import Stage
from vistune.model.vision import build_vision_tower
from vistune.train.kinds import BUILT_IN, needs_unused_parameters, stage_kinds
from vistune.train.loop import make_accelerator


@pytest.mark.parametrize(
    "kind, train, needed",
    [
        ("vlm", ["projector"], False),
        ("vlm", ["projector", "lora"], False),
        ("vlm", ["projector", "llm"], False),
        ("vlm", ["vision", "projector"], True),
        ("contrastive", ["projector"], False),
        ("contrastive", ["vision", "projector"], True),
        ("contrastive", ["projector", "llm"], True),
        ("classify", ["vision"], True),
        ("scene", ["vision"], True),
    ],
)
def test_a_run_asks_for_unused_parameter_detection_only_where_a_kind_needs_it(kind, train, needed):
    assert needs_unused_parameters([Stage(name="s", kind=kind, train=train)]) is needed
    projector_only = Stage(name="p", train=["projector"])
    assert needs_unused_parameters([projector_only, Stage(name="s", kind=kind, train=train)]) is needed


@pytest.mark.parametrize("kind, unused", [("clip", True), ("siglip", True), ("resnet", False)])
def test_a_learning_tower_can_hold_parameters_its_features_never_reach(kind, unused):
    """Why a kind that trains the tower asks: a CLIP or SigLIP tower's final layer norm gets no gradient."""
    tower = build_vision_tower(tiny_vision(kind)).train()
    tower(torch.randn(2, 3, 16, 16)).sum().backward()
    missing = [name for name, p in tower.named_parameters() if p.grad is None]
    assert bool(missing) is unused, missing


def test_the_accelerator_passes_the_answer_to_ddp():
    for flag in (True, False):
        kwargs = make_accelerator(flag).ddp_handler.to_kwargs()
        assert kwargs.get("find_unused_parameters", False) is flag


def test_every_built_in_kind_declares_its_options():
    kinds = stage_kinds()
    assert set(BUILT_IN) == {"vlm", "contrastive", "classify", "clm", "mlm", "nsp", "plm"}
    assert set(BUILT_IN) < set(kinds)
    for name, part in kinds.items():
        # an encoder kind must be told which encoder it trains: a new one's tokenizer or a saved one
        options = {"tokenizer": "wordpiece"} if name in ("mlm", "nsp", "plm") else {}
        assert Stage(name="s", kind=name, train=["vision"], options=options).options is not None, name
        assert part.options is not None, name
