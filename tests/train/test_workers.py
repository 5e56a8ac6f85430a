"""Host batches built by DataLoader workers (`workers: N`): the same batches, in the same order, as the
training process builds (`workers: 0`), from the first step or from a resumed one; the host part of
every objective holds no model."""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from vistune.config import Stage, config_from_dict
from vistune.data.images import load_image
from vistune.model.vlm import build_vlm
from vistune.train.kinds import build_objective
from vistune.train.loop import host_steps, make_accelerator
from vistune.train.objective import StageContext, pixel_fn

STEPS = 5  # past one epoch of the tiny world's 6 records (4 per step): the order wraps around
KINDS = {
    "vlm": (["projector", "llm"], "vlm", {"options": {"cache_features": False}}),
    "vlm-cached": (["projector", "llm"], "vlm", {}),
    "vlm-packed": (["vision", "projector", "llm"], "vlm", {"options": {"pack": True}}),
    "scene": (["vision"], "scene", {}),
    "classify": (["vision"], "classify", {}),
    "contrastive": (["vision", "projector"], "contrastive", {}),
}


def _objective(one_stage, name: str):
    train, kind, settings = KINDS[name]
    cfg = config_from_dict(one_stage(train, kind, **settings))
    torch.manual_seed(0)
    model = build_vlm(cfg.model)
    return build_objective(
        cfg.stages[0], model, StageContext(torch.device("cpu"), Path("unused"))
    ), cfg.stages[0]


def _same(a: Any, b: Any, where: str = "batch") -> None:
    """Equal host batches; `new_images` (the pixels a cached stage's batcher sends once) may hold more
    on the worker side: a worker also sends an image that another worker sent first."""
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        if where.endswith("new_images"):
            assert set(a) <= set(b), where
        else:
            assert a.keys() == b.keys(), where
        for key in a:
            _same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for k, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(x, y, f"{where}[{k}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(KINDS))
def test_workers_build_the_batches_the_loop_builds(one_stage, name):
    objective, stage = _objective(one_stage, name)
    accelerator = make_accelerator()
    in_process = list(host_steps(objective, accelerator, stage, 7, 0, STEPS))
    assert len(in_process) == STEPS and all(len(step) == stage.grad_accum for step in in_process)
    two = dataclasses.replace(stage, workers=2)
    with_workers = list(host_steps(objective, accelerator, two, 7, 0, STEPS))
    _same(in_process, with_workers)
    # a stage resumed at step 3 starts from step 3's batches
    _same(in_process[3:], list(host_steps(objective, accelerator, two, 7, 3, STEPS)))
    if name == "vlm-cached":  # the cache's bookkeeping: each image's pixels sent, once per batcher
        sent = [k for step in in_process for b in step for k in b["new_images"]]
        keys = {k for step in in_process for b in step for k in b["image_keys"]}
        assert sorted(sent) == sorted(keys)


class _NoModules(pickle.Pickler):
    """Pickles as usual, but stops at any module or parameter (a batcher must hold neither)."""

    def persistent_id(self, obj: Any) -> None:
        if isinstance(obj, (nn.Module, nn.Parameter)):
            raise AssertionError(f"the batcher holds a {type(obj).__name__}")
        return None


@pytest.mark.parametrize("name", ["vlm-cached", "vlm-packed", "scene", "classify", "contrastive"])
def test_a_batcher_holds_no_model_and_survives_pickling(one_stage, name):
    objective, _ = _objective(one_stage, name)
    batcher = objective.batcher()
    assert objective.batcher() is batcher or name not in ("vlm-cached", "vlm-packed")
    _NoModules(io.BytesIO()).dump(batcher)
    copy = pickle.loads(pickle.dumps(batcher))  # what a spawned worker would receive
    _same(objective.batcher()([0, 1]), copy([0, 1]))


def test_the_host_preprocessing_is_the_towers(one_stage, tiny_world):
    cfg = config_from_dict(one_stage(["projector"]))
    tower = build_vlm(cfg.model).vision
    images = [load_image(p) for p in sorted((tiny_world / "images" / "train").glob("*.png"))[:3]]
    assert torch.equal(pixel_fn(tower)(images), tower.preprocess(images))


def test_workers_must_not_be_negative():
    with pytest.raises(ValueError, match=r"stage 's': workers must be at least 0, got -1"):
        Stage(name="s", workers=-1)
