"""Relevance maps: a planted model (a hand-made tower that sees one region only) gets each method's maximum
there; every tower and projector gives maps of its grid's shape; integrated gradients add up."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn
from torch.nn import functional as F

from vistune.config import VisionConfig
from vistune.data.records import Turn
from vistune.infer.explain import METHODS, Explainer, cell_box, conversation
from vistune.infer.generate import Generator
from vistune.model.vision import VisionTower
from vistune.model.vlm import VLM

PLANTED = (1, 2)  # row, column of the one cell the planted tower sees (not its mirror nor transpose)
SIDE, CELLS = 16, 4  # 16 px images, a 4 x 4 grid of 4 px cells


class OneCell(nn.Module):
    """A hand-made tower: each 4 px cell's mean colour, zero everywhere but the planted cell."""

    def __init__(self) -> None:
        super().__init__()
        mask = torch.zeros(1, 1, CELLS, CELLS)
        mask[..., PLANTED[0], PLANTED[1]] = 1.0
        self.register_buffer("mask", mask)
        self.gain = nn.Parameter(torch.tensor(4.0))

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True) -> SimpleNamespace:
        cells = F.avg_pool2d(pixel_values, SIDE // CELLS) * self.mask * self.gain  # (B, 3, 4, 4)
        return SimpleNamespace(hidden_states=(cells,))


def _generator(vlm: VLM) -> Generator:
    return Generator(vlm.llm, vlm.tokenizer, vlm, batch_size=2)


def _planted(tiny_vlm, projector: str) -> Generator:
    donor = tiny_vlm("resnet", projector, seed=1)
    # mean 0, std 1: a black pixel is a zero feature, so black is "nothing there"
    tower = VisionTower(VisionConfig(kind="resnet", image_size=SIDE), OneCell(), SIDE, ((0, 0, 0), (1, 1, 1)))
    torch.manual_seed(1)
    return _generator(VLM(donor.cfg, tower, donor.llm, donor.tokenizer).eval())


def _scene() -> Image.Image:
    """Black, a red square filling the planted cell, a blue one in another cell (which the tower ignores)."""
    image = Image.new("RGB", (SIDE, SIDE), "black")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = cell_box(SIDE, (CELLS, CELLS), *PLANTED)
    draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=(255, 0, 0))
    draw.rectangle((0, 12, 3, 15), fill=(0, 0, 255))
    return image


def _favoured_word(explainer: Explainer, turns: list[Turn], image: Image.Image) -> str:
    """The one-token answer whose probability the planted cell raises most (against a black image)."""
    case = explainer.prepare(turns, [image], "x")
    vlm = explainer.vlm
    with torch.no_grad():
        features = torch.stack([case.features, torch.zeros_like(case.features)])
        embeds = vlm.embed(case.ids[:, :-1].expand(2, -1), vision_features=features.flatten(0, 1))
        hidden = vlm.llm.get_decoder()(inputs_embeds=embeds).last_hidden_state[:, -1]
        lp = vlm.llm.get_output_embeddings()(hidden).log_softmax(-1)
    tokenizer = explainer.generator.tokenizer
    for token in (lp[0] - lp[1]).argsort(descending=True).tolist():
        text = tokenizer.decode([token])
        if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == [token]:
            return text
    raise AssertionError("no token round-trips")


@pytest.mark.parametrize("projector", ["linear", "pixel_shuffle", "resampler"])
def test_each_method_finds_the_planted_region(tiny_vlm, projector):
    explainer = Explainer(_planted(tiny_vlm, projector), batch_size=8, steps=8)
    image = _scene()
    turns = [Turn("user", "<image>\nWhat is there?", 1)]
    answer = _favoured_word(explainer, turns, image)
    for method in METHODS:
        found = explainer.explain(turns, [image], answer, method)
        assert found.maps[0].shape == (CELLS, CELLS)
        assert found.peak(0) == PLANTED, (method, found.maps[0])
        assert found.cell_box(0, *found.peak(0)) == (8, 4, 12, 8)  # x 8..12, y 4..8: where the red square is
        others = np.delete(found.maps[0].ravel(), PLANTED[0] * CELLS + PLANTED[1])
        assert np.abs(others).max() < 1e-5  # the tower never sees them: they cannot matter


def test_integrated_gradients_add_up_to_the_change_from_the_blank_image(tiny_vlm):
    generator = _generator(tiny_vlm("clip", "mlp2x_gelu", seed=2))
    explainer = Explainer(generator, steps=32)
    image = Image.new("RGB", (16, 16), "white")
    ImageDraw.Draw(image).ellipse((2, 2, 9, 9), fill=(0, 160, 0))
    turns = [Turn("user", "<image>\nWhat colour is the circle?", 1)]
    found = explainer.explain(turns, [image], "green", "integrated")
    case = explainer.prepare(turns, [image], "green")
    with torch.no_grad():
        blank = explainer.tower(explainer.blank(case))
        gap = found.logprob - float(explainer.logprobs(case, blank[None])[0])
    assert found.maps[0].sum() == pytest.approx(gap, rel=0.05, abs=0.02)


TOWER_KINDS = ["clip", "siglip", "resnet"]


@pytest.mark.parametrize("kind", TOWER_KINDS)
@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "pixel_shuffle", "resampler"])
def test_maps_have_the_towers_grid_for_every_projector(tiny_vlm, kind, projector):
    if kind == "resnet" and projector == "pixel_shuffle":
        pytest.skip("the tiny ResNet's 2x2 grid holds one 2x2 block: covered by clip and siglip")
    generator = _generator(tiny_vlm(kind, projector, seed=0))
    explainer = Explainer(generator, batch_size=8, steps=4)
    images = [Image.new("RGB", (20, 12), "orange"), Image.new("RGB", (12, 12), "navy")]
    turns, answer = conversation(["Describe it.", "And the colour?"], ["A square.", "blue"], 2)
    for method in METHODS:
        found = explainer.explain(turns, images, answer, method)
        assert [m.shape for m in found.maps] == [generator.vlm.vision.grid] * 2
        assert all(np.isfinite(m).all() for m in found.maps)
    layout = {"linear": "cells", "mlp2x_gelu": "cells", "pixel_shuffle": "blocks of 2x2 cells"}
    assert found.layout == layout.get(projector, "pooled")


def test_a_cls_token_is_reported_apart_and_the_model_answers_when_no_answer_is_given(tiny_vlm, tmp_path):
    generator = _generator(
        tiny_vlm(
            "clip",
            "linear",
            seed=0,
        )
    )
    generator.vlm.vision.config.use_cls = True
    vlm = VLM(generator.vlm.cfg, generator.vlm.vision, generator.vlm.llm, generator.vlm.tokenizer).eval()
    generator = _generator(vlm)
    explainer = Explainer(generator)
    image = Image.new("RGB", (16, 16), "red")
    turns = [Turn("user", "<image>\nWhat colour?", 1)]
    found = explainer.explain(turns, [image], None, "gradient", max_new_tokens=3)
    assert found.generated and found.answer == generator.generate([turns], [[image]], max_new_tokens=3)[0]
    assert found.maps[0].shape == (4, 4) and len(found.cls) == 1
    written = found.save(tmp_path)
    assert sorted(p.name for p in written) == ["explain-0.npy", "explain-0.png", "explain.json"]
    assert np.array_equal(np.load(tmp_path / "explain-0.npy"), found.maps[0])
    assert Image.open(tmp_path / "explain-0.png").size[0] > 100


def test_deletion_curve_starts_at_the_answers_probability(tiny_vlm):
    explainer = Explainer(_generator(tiny_vlm("clip", "linear", seed=0)), batch_size=4)
    image = Image.new("RGB", (16, 16), "white")
    turns = [Turn("user", "<image>\nWhat is it?", 1)]
    found = explainer.explain(turns, [image], "a star", "occlusion")
    case = explainer.prepare(turns, [image], "a star")
    curve = explainer.deletion_curve(case, found.maps[0], points=4)
    assert curve.shape == (5,) and curve[0] == pytest.approx(np.exp(found.logprob), rel=1e-4)


def test_bad_requests_say_what_is_wrong(tiny_vlm):
    explainer = Explainer(_generator(tiny_vlm("clip", "linear", seed=0)))
    turns = [Turn("user", "<image>\nWhat?", 1)]
    image = Image.new("RGB", (16, 16), "white")
    with pytest.raises(ValueError, match="method 'saliency' is not one of"):
        explainer.explain(turns, [image], "x", "saliency")
    with pytest.raises(ValueError, match="the answer is empty"):
        explainer.explain(turns, [image], "", "gradient")
    with pytest.raises(ValueError, match="no image"):
        explainer.explain([Turn("user", "Hi", 0)], [], "x")
    with pytest.raises(ValueError, match="one answer per prompt"):
        conversation(["a"], ["b", "c"], 1)


def test_the_command_writes_overlay_grid_and_json_for_each_method(tiny_vlm, tmp_path, capsys):
    from vistune.cli import main
    from vistune.model.vlm import save_vlm

    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), tmp_path / "model")
    Image.new("RGB", (16, 16), "red").save(tmp_path / "red.png")
    argv = ["explain", str(tmp_path / "model"), "--image", str(tmp_path / "red.png"),
            "--prompt", "What is it?", "--answer", "a dog", "--prompt", "And its colour?",
            "--method", "gradient", "--method", "occlusion", "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "gradient: answer" in out and "occlusion: answer" in out
    for method in ("gradient", "occlusion"):
        saved = json.loads((tmp_path / "out" / f"{method}.json").read_text())
        assert saved["method"] == method and saved["generated"] and saved["maps"][0]["grid"] == [4, 4]
        assert [t["role"] for t in saved["turns"]] == ["user", "assistant", "user"]
        assert np.load(tmp_path / "out" / f"{method}-0.npy").shape == (4, 4)
    first = json.loads((tmp_path / "out" / "gradient.json").read_text())["answer"]
    assert json.loads((tmp_path / "out" / "occlusion.json").read_text())["answer"] == first  # one answer


def test_the_command_refuses_what_is_not_a_model_dir(tmp_path, capsys):
    from vistune.cli import main

    argv = ["explain", str(tmp_path), "--image", "x.png", "--prompt", "Hi?", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "not a vistune model dir" in capsys.readouterr().err


@pytest.mark.parametrize("projector", ["object_words", "visual_words"])
def test_an_extensions_projector_is_mapped_through_the_towers_grid(tiny_model_config, projector):
    from vistune.model.vlm import build_vlm

    cfg = tiny_model_config("clip", projector)
    cfg.projector.options = {"words": [["small", "large"], ["red", "blue"]], "slots": 2}
    torch.manual_seed(0)
    generator = _generator(build_vlm(cfg).eval())
    explainer = Explainer(generator, batch_size=8, steps=4)
    image = Image.new("RGB", (16, 16), "white")
    ImageDraw.Draw(image).rectangle((1, 1, 6, 6), fill=(220, 20, 20))
    turns = [Turn("user", "<image>\nWhat colour is it?", 1)]
    for method in METHODS:
        found = explainer.explain(turns, [image], "red", method)
        assert found.maps[0].shape == (4, 4) and np.isfinite(found.maps[0]).all()
        assert found.layout == "extension"
