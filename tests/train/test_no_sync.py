"""A training step reads nothing back to the host (a stall on a GPU), counted on the CPU.

Every torch call inside `train_step` passes through a TorchFunctionMode (`vistune.train.syncs.HostReads`)
that records the ones which would wait for a GPU: reading a value (`item`, `bool`, `int`, `float`,
`tolist`, `numpy`) or taking a data-dependent shape (`nonzero`, boolean indexing, `masked_select`,
`unique`). Batches are built before the step, on the host (`step_batches`); the step itself must record
nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vistune.config import config_from_dict
from vistune.model.vlm import build_vlm
from vistune.train.kinds import build_objective
from vistune.train.loop import make_accelerator, step_batches, train_step
from vistune.train.objective import StageContext
from vistune.train.syncs import HostReads
from vistune.train.trainable import set_trainable


def _steps_under(mode: HostReads, cfg: dict, steps: int = 2) -> None:
    """Run `steps` optimizer steps of the config's only stage with `mode` active inside each step."""
    cfg = config_from_dict(cfg)
    stage = cfg.stages[0]
    model = build_vlm(cfg.model)
    accelerator = make_accelerator()
    objective = build_objective(stage, model, StageContext(accelerator.device, Path(cfg.out)))
    optimizer = torch.optim.AdamW(set_trainable(objective, objective.parts(), stage), fused=True)
    wrapped, prepared = accelerator.prepare(objective, optimizer)
    for step in range(steps):
        batches = step_batches(objective, accelerator, stage, 0, step)  # on the host, as a DataLoader would
        with mode:
            train_step(wrapped, objective, prepared, accelerator, stage, batches)


@pytest.mark.parametrize(
    "train, kind, settings",
    [
        (["projector", "llm"], "vlm", {}),  # frozen tower: cached features
        (["lora"], "vlm", {}),
        (["vision", "projector", "llm"], "vlm", {}),  # the tower runs in the step
        (["vision"], "scene", {}),
        (["vision"], "classify", {}),
        pytest.param(
            ["vision", "projector"],
            "contrastive",
            {},
            marks=pytest.mark.xfail(
                strict=True, reason="the text tower passes its padding mask, and transformers reads it back"
            ),
        ),
        pytest.param(
            ["projector", "llm"],
            "vlm",
            {"options": {"pack": True}},
            marks=pytest.mark.xfail(
                strict=True,
                reason="transformers reads back whether the position ids hold packed records "
                "(find_packed_sequence_indices), once per micro-batch",
            ),
        ),
    ],
)
def test_a_training_step_reads_nothing_back(one_stage, train, kind, settings):
    mode = HostReads()
    _steps_under(mode, one_stage(train, kind, **settings))
    assert mode.calls == []


def test_the_counter_sees_a_read(one_stage, monkeypatch):
    """The check can fail: a loss read back inside the step is recorded."""
    from vistune.train.vlm import VLMObjective

    forward = VLMObjective.forward

    def reading(self, batch):
        loss = forward(self, batch)
        float(loss)
        return loss

    monkeypatch.setattr(VLMObjective, "forward", reading)
    mode = HostReads()
    _steps_under(mode, one_stage(["projector"]), steps=1)
    assert "__float__" in mode.calls
