"""The scene objective's targets: which cell names which object, and the centre votes around it."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from vistune.commands.train import train
from vistune.config import Stage, config_from_dict
from vistune.model.vlm import build_vlm
from vistune.shapes.questions import COLORS, SHAPES, SIZES
from vistune.shapes.scene import ATTRIBUTES, SceneObjective, cell_offsets, cell_targets, mirror_targets
from vistune.shapes.synth import synthesize
from vistune.train import loop
from vistune.train.objective import StageContext, build_batch


def _scene(*objects):
    keys = ("color", "shape", "size", "x", "y")
    return {"width": 64, "height": 64, "objects": [dict(zip(keys, o, strict=True)) for o in objects]}


def test_the_centre_cell_names_the_object_and_its_neighbours_vote_for_its_centre():
    scene = _scene(("blue", "star", "large", 20.0, 44.0), ("red", "circle", "small", 34.0, 44.0))
    targets, (offsets, near) = cell_targets(scene, (8, 8)), cell_offsets(scene, (8, 8))
    star, circle = 5 * 8 + 2, 5 * 8 + 4  # (row, column) (5, 2) and (5, 4)
    vocab = list(ATTRIBUTES.values())
    assert targets[star].tolist() == [vocab[0].index("blue") + 1, vocab[1].index("star") + 1, 2]
    assert targets[circle].tolist() == [vocab[0].index("red") + 1, vocab[1].index("circle") + 1, 1]
    assert int((targets[:, 0] > 0).sum()) == 2
    # the centre in cell sides from each cell's corner: (2.5, 5.5) for the star, (4.25, 5.5) for the circle
    torch.testing.assert_close(offsets[star], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(offsets[4 * 8 + 1], torch.tensor([1.5, 1.5]))  # the star's upper-left cell
    # cell (5, 3) lies between them and votes for the nearer centre, the circle's
    torch.testing.assert_close(offsets[5 * 8 + 3], torch.tensor([1.25, 0.5]))
    assert int(near.sum()) == 9 + 9 - 3 and not near[0]


def _scene_stage(world_dir, **fields) -> Stage:
    data = [{"path": str(world_dir / "scenes" / "train.jsonl"), "image_root": str(world_dir / "images")}]
    return Stage(**{"name": "vision", "kind": "scene", "train": ["vision"], "data": data, **fields})


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    synthesize(out, sizes={"train": 4, "val": 0, "test": 0, "compositional": 0}, workers=1)
    return out


def test_scene_objective_checks_its_stage(tiny_vlm, world_dir):
    model, ctx = tiny_vlm("resnet"), StageContext(torch.device("cpu"), world_dir)
    with pytest.raises(ValueError, match="scene stage must train the vision tower"):
        SceneObjective(_scene_stage(world_dir, train=["projector"]), model, ctx)
    stage = _scene_stage(world_dir)
    stage.data[0].where = {"question_type": ["count"]}
    with pytest.raises(ValueError, match="`where` filters records; scene files have none"):
        SceneObjective(stage, model, ctx)


def test_scene_heads_start_the_object_words_classifiers(tiny_model_config, world_dir):
    cfg = tiny_model_config("resnet", "object_words")
    cfg.projector.options = {"words": [list(SIZES), list(COLORS), list(SHAPES)], "slots": 2}
    model = build_vlm(cfg)
    objective = SceneObjective(_scene_stage(world_dir), model, StageContext(torch.device("cpu"), world_dir))
    assert len(objective) == 4 and set(objective.parts()) == {"vision"}
    loss = objective(build_batch(objective, [0, 1]))
    # images x cells x attributes
    assert torch.isfinite(loss) and objective.count(build_batch(objective, [0, 1])) == 2 * 4 * 3
    objective.finish()
    torch.testing.assert_close(model.projector.offset.weight, objective.heads["offset"].weight)
    # the colour group lists COLORS in order, so its classifier is the colour head as it is
    torch.testing.assert_close(model.projector.classifiers[1].weight, objective.heads["color"].weight)


def test_mirrored_targets_are_the_targets_of_the_mirrored_scene():
    scene = _scene(("blue", "star", "large", 20.0, 44.0), ("red", "circle", "small", 51.3, 9.7))
    mirror = {**scene, "objects": [{**o, "x": 64 - o["x"]} for o in scene["objects"]]}
    grid = (8, 8)
    batch = [t[None] for t in (cell_targets(scene, grid), *cell_offsets(scene, grid))]
    targets, offsets, near = mirror_targets(*batch, grid, torch.tensor([True]))
    torch.testing.assert_close(targets[0], cell_targets(mirror, grid))
    want_offsets, want_near = cell_offsets(mirror, grid)
    assert torch.equal(near[0], want_near)
    torch.testing.assert_close(offsets[0][want_near], want_offsets[want_near])


def test_an_augmented_scene_stage_resumes_exactly(one_stage, tmp_path, monkeypatch):
    def config(out):
        raw = one_stage(
            ["vision"],
            kind="scene",
            max_steps=4,
            options={"augment": {"flip": 0.5, "grayscale": 0.5, "brightness": 0.1, "noise": 0.02}},
        )
        return config_from_dict(raw | {"out": str(out), "save_every": 2})  # fmt: skip

    whole = load_file(train(config(tmp_path / "whole")) / "vision_projector.safetensors")
    real, calls = loop.train_step, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # after the step-2 checkpoint
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"))
    monkeypatch.setattr(loop, "train_step", real)
    resumed = load_file(train(config(tmp_path / "cut"), resume=True) / "vision_projector.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key
