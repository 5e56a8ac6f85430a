"""An extension adds a stage kind with options of its own, and a command, with no edit in the core.

The extension here is a package written into a temporary folder: a module with a register function and
a dist-info whose entry point names it, found on sys.path as an installed extension would be.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from vistune import cli, extensions
from vistune.config import config_from_dict
from vistune.train.kinds import needs_unused_parameters, stage_kinds

EXTENSION = '''
"""A stage kind that teaches the tower to tell an image's mean brightness, scaled by its options."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vistune.config import StageOptions
from vistune.data.images import load_image
from vistune.extensions import register_command, register_stage_kind
from vistune.train.objective import move_to, pixel_fn


@dataclass
class BrightnessOptions(StageOptions):
    scale: float = 1.0
    images: int = 4

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"scale must be above 0, got {self.scale}")

    def check(self, stage):
        if stage.batch_size > self.images:
            raise ValueError(f"stage {stage.name!r}: batch_size is more than options.images")


class Batcher:
    def __init__(self, paths, pixels):
        self.paths, self.pixels = paths, pixels

    def __call__(self, indices):
        pixels = self.pixels([load_image(self.paths[i]) for i in indices])
        return {"pixels": pixels, "target": pixels.mean(dim=(1, 2, 3))}


class Brightness(nn.Module):
    def __init__(self, stage, model, ctx):
        super().__init__()
        self.tower, self.device, self.scale = model.vision, ctx.device, stage.options.scale
        self.head = nn.Linear(model.vision.hidden_size, 1)
        self.paths = sorted(Path(stage.data[0].path).rglob("*.png"))[: stage.options.images]

    def __len__(self):
        return len(self.paths)

    def lengths(self):
        return None

    def describe(self):
        return {"images": len(self.paths), "scale": self.scale}

    def parts(self):
        return {"vision": [*self.tower.parameters(), *self.head.parameters()]}

    def batcher(self):
        return Batcher(self.paths, pixel_fn(self.tower))

    def to_device(self, batch):
        return move_to(batch, self.device)

    def count(self, batch):
        return len(batch["target"])

    def forward(self, batch):
        guess = self.head(self.tower(batch["pixels"]).mean(1))[:, 0]
        return F.mse_loss(guess, self.scale * batch["target"], reduction="sum")

    def health(self):
        return {}, None

    def finish(self):
        pass


def hello(argv):
    print("hello from", argv)
    return 0


def register():
    register_stage_kind("brightness", Brightness, options=BrightnessOptions, find_unused_parameters=True)
    register_command("hello", "brightness_ext:hello", "say hello")
'''


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """The extension on sys.path with its entry point, and the tables as they were before, afterwards."""
    root = tmp_path / "site"
    (root / "brightness_ext-0.1.dist-info").mkdir(parents=True)
    (root / "brightness_ext-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: brightness-ext\nVersion: 0.1\n"
    )
    (root / "brightness_ext-0.1.dist-info" / "entry_points.txt").write_text(
        f"[{extensions.GROUP}]\nbrightness = brightness_ext:register\n"
    )
    (root / "brightness_ext.py").write_text(textwrap.dedent(EXTENSION))
    monkeypatch.syspath_prepend(str(root))
    for table in ("PROJECTORS", "STAGE_KINDS", "COMMANDS", "SUITES", "REPORT_SECTIONS"):
        monkeypatch.setattr(extensions, table, {})
    monkeypatch.setattr(extensions, "_loaded", False)
    yield
    sys.modules.pop("brightness_ext", None)


def _config(one_stage, tmp_path, **options) -> dict:
    raw = one_stage(["vision"], kind="vlm", max_steps=2, batch_size=2, grad_accum=1)
    raw["stages"][0] |= {"kind": "brightness", "data": [{"path": "images"}], "options": options}
    return raw | {"out": str(tmp_path / "run")}


def test_an_extension_kind_with_its_own_options_trains(installed, one_stage, tmp_path):
    from vistune import train_model

    raw = _config(one_stage, tmp_path, scale=2.0)
    cfg = config_from_dict(raw)
    assert "brightness" in stage_kinds() and type(cfg.stages[0].options).__name__ == "BrightnessOptions"
    assert cfg.stages[0].options.scale == 2.0 and needs_unused_parameters(cfg.stages)
    assert cfg.to_dict()["stages"][0]["options"] == {"scale": 2.0, "images": 4}
    train_model(cfg)
    rows = [json.loads(x) for x in (Path(raw["out"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [0, 1]
    started = next(r for r in rows if r.get("event") == "stage")
    assert (started["stage"], started["images"], started["scale"]) == ("s", 4, 2.0)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scale": 0}, "stages[0].options: scale must be above 0, got 0"),
        ({"scale": "big"}, "stages[0].options.scale: expected float, got 'big'"),
        ({"pack": True}, "stages[0].options: unknown field(s) ['pack']; valid: ['images', 'scale']"),
        ({"images": 1}, "batch_size is more than options.images"),
    ],
)
def test_an_extension_kinds_options_are_checked_naming_the_field(
    installed, one_stage, tmp_path, options, message
):
    with pytest.raises(ValueError) as err:
        config_from_dict(_config(one_stage, tmp_path, **options))
    assert message in str(err.value)


def test_an_extension_adds_a_command(installed, capsys):
    assert cli.main(["hello", "there"]) == 0
    assert "hello from ['there']" in capsys.readouterr().out
    assert "hello" in cli._usage()


def test_without_the_extension_its_kind_is_unknown(monkeypatch, one_stage, tmp_path):
    monkeypatch.setattr(extensions, "STAGE_KINDS", {})
    monkeypatch.setattr(extensions, "_loaded", True)  # as if no extension were installed
    with pytest.raises(ValueError, match=r"stages\[0\]: kind 'brightness' is not one of \['classify'"):
        config_from_dict(_config(one_stage, tmp_path))
