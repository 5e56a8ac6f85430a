"""Fixtures of the training tests: a tiny shapes world and one-stage configs on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from vistune.shapes.synth import synthesize

KIND_DATA = {
    "vlm": {"path": "train/conversations.json", "image_root": "images"},
    "scene": {"path": "scenes/train.jsonl", "image_root": "images"},
    "classify": {"path": "imagefolder/train"},
    "contrastive": {"path": "train/pairs.jsonl", "image_root": "images"},
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """Six training scenes with every file a stage kind reads (ImageFolder included)."""
    root = tmp_path_factory.mktemp("tiny-world") / "data"
    synthesize(root, sizes={"train": 6, "val": 0, "test": 0, "compositional": 0}, workers=1, imagefolder=True)
    return root


@pytest.fixture
def one_stage(tiny_world, tiny_llm_dir) -> Callable[..., dict]:
    """`one_stage(train, kind="vlm", **stage)`: a raw config of one stage of `kind` on the tiny world,
    a tiny CLIP tower, `mlp2x_gelu` and the tiny LLM (also the contrastive text tower)."""

    def make(train: list[str], kind: str = "vlm", **settings) -> dict:
        vision = {"kind": "clip", "image_size": 16, "patch_size": 4, "hidden_size": 16, "num_layers": 1,
                  "num_heads": 2, "intermediate_size": 32}  # fmt: skip
        stage = {"name": "s", "kind": kind, "train": train, "batch_size": 2, "grad_accum": 2, "max_steps": 2,
                 "max_length": 128, "lr": 0.01, "lora_rank": 4, "data": [KIND_DATA[kind]]}  # fmt: skip
        if kind == "contrastive":
            stage |= {"text_tower": str(tiny_llm_dir), "max_length": 32, "chunk_size": 2, "grad_accum": 1,
                      "batch_size": 4}  # fmt: skip
        return {
            "data_root": str(tiny_world),
            "model": {
                "vision": vision,
                "projector": {"name": "mlp2x_gelu"},
                "llm": {"name_or_path": str(tiny_llm_dir), "chat_template": "chatml"},
            },
            "stages": [stage | settings],
        }

    return make
