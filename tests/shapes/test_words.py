"""The shapes world's word projectors: visual words, object words, and their settings."""

from __future__ import annotations

import pytest
import torch

from vistune.config import ProjectorConfig
from vistune.model.projector import ProjectorContext, build_projector, upgrade_projector

IN_DIM, OUT_DIM, GRID = 12, 20, (4, 6)


def make(cfg: ProjectorConfig, tokenizer, table: torch.Tensor | None = None):
    """Build a word projector whose words start from `table` (random when None)."""
    table = torch.randn(len(tokenizer), OUT_DIM) if table is None else table
    return build_projector(cfg, ProjectorContext(IN_DIM, OUT_DIM, GRID, table, tokenizer))


WORDS = [["red", "blue"], ["circle", "star", "square"]]


def test_visual_words_shape_and_block_sum(smollm2_tokenizer):
    torch.manual_seed(0)
    proj = make(ProjectorConfig(name="visual_words", options={"words": WORDS}), smollm2_tokenizer)
    x = torch.randn(2, GRID[0] * GRID[1], IN_DIM)
    y = proj(x)
    assert y.shape == (2, 6, OUT_DIM) and proj.num_tokens(24) == 6
    # token 0 is the sum of the mixtures of grid cells (0,0), (0,1), (1,0), (1,1)
    cells = [0, 1, GRID[1], GRID[1] + 1]
    mix = sum(
        (c(x[:, cells]).softmax(-1)[..., 1:] @ v).sum(1)
        for c, v in zip(proj.classifiers, proj.words, strict=True)
    )
    torch.testing.assert_close(y[:, 0], mix)


def test_visual_words_start_from_llm_embeddings_and_scene_heads(smollm2_tokenizer):
    table = torch.randn(len(smollm2_tokenizer), OUT_DIM)
    proj = make(ProjectorConfig(name="visual_words", options={"words": WORDS}), smollm2_tokenizer, table)
    star = smollm2_tokenizer(" star", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(proj.words[1][1].detach(), table[star].mean(0))
    # scene heads list classes as none + their own vocabulary order; the projector reorders by word
    heads = {"shape": torch.nn.Linear(IN_DIM, 4), "color": torch.nn.Linear(IN_DIM, 3)}
    vocab = {"shape": ("square", "circle", "star"), "color": ("blue", "red")}
    proj.init_classifiers(heads, vocab)
    torch.testing.assert_close(proj.classifiers[1].weight[1], heads["shape"].weight[2])  # circle
    torch.testing.assert_close(proj.classifiers[1].weight[3], heads["shape"].weight[1])  # square
    torch.testing.assert_close(proj.classifiers[0].weight[1], heads["color"].weight[2])  # red


def test_visual_words_needs_words(smollm2_tokenizer):
    with pytest.raises(ValueError, match="visual_words: options.words is required"):
        make(ProjectorConfig(name="visual_words"), smollm2_tokenizer)


OBJECT_WORDS = [["small", "large"], ["red", "blue"], ["circle", "star", "square"]]


def _object_words(tokenizer, slots: int = 3, bins: int = 10, table=None, count: bool = False, **more):
    options = {"words": OBJECT_WORDS, "slots": slots, "position_bins": bins, "count": count, **more}
    cfg = ProjectorConfig(name="object_words", options=options)
    return make(cfg, tokenizer, table)


def _plant(proj, features: torch.Tensor, cells: dict[int, tuple[int, int, int, float, float]]) -> None:
    """Make the classifiers read one-hot features: feature k of a cell switches on class k of a group.

    cells: cell index -> (size, colour, shape) word index and the centre (x, y) it votes for, in cell
    sides from the cell's corner.
    """
    with torch.no_grad():
        for g, classifier in enumerate(proj.classifiers):
            classifier.weight.zero_()
            classifier.bias.zero_()
            classifier.bias[0] = 5.0  # "none" unless a cell's feature says otherwise
            for k in range(classifier.out_features - 1):
                classifier.weight[k + 1, 3 * g + k] = 20.0
        proj.offset.weight.zero_()
        proj.offset.bias.zero_()
        proj.offset.weight[0, 9] = proj.offset.weight[1, 10] = 1.0  # features 9, 10 are the centre vote
        for cell, (size, color, shape, dx, dy) in cells.items():
            features[:, cell, [size, 3 + color, 6 + shape]] = 1.0
            features[:, cell, 9], features[:, cell, 10] = dx, dy


def test_object_words_reads_objects_left_to_right_with_digit_positions(smollm2_tokenizer):
    proj = _object_words(smollm2_tokenizer, slots=3)
    x = torch.zeros(1, GRID[0] * GRID[1], IN_DIM)
    # grid 4 rows x 6 columns: cell 11 is row 1, column 5; cell 18 is row 3, column 0
    _plant(proj, x, {11: (1, 0, 1, 0.5, 0.5), 18: (0, 1, 2, 0.25, 0.75)})
    assert proj.read(x) == ["small blue square 0 9, large red star 9 3"]
    y = proj(x)
    assert y.shape == (1, 3 * 5, OUT_DIM) and proj.num_tokens(24) == 15
    # slot 0 (leftmost): small, blue, square, digit 0, digit 9; slot 2 is unused and reads "none"
    expected = [proj.words[0][0], proj.words[1][1], proj.words[2][2], proj.digits[0], proj.digits[9]]
    torch.testing.assert_close(y[0, :5], torch.stack(expected).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[0, 10:], proj.none.detach().expand(5, -1))


def test_object_words_can_say_how_many_objects_it_found_first(smollm2_tokenizer):
    proj = _object_words(smollm2_tokenizer, slots=3, bins=5, count=True)
    x = torch.zeros(1, GRID[0] * GRID[1], IN_DIM)
    _plant(proj, x, {11: (1, 0, 1, 0.5, 0.5), 18: (0, 1, 2, 0.25, 0.75)})
    assert proj.read(x) == ["2: small blue square 0 4, large red star 4 1"]
    y = proj(x)
    assert y.shape == (1, 1 + 3 * 5, OUT_DIM) and proj.num_tokens(24) == 16
    torch.testing.assert_close(y[0, 0], proj.digits[2].detach())  # the count, then the objects as before
    torch.testing.assert_close(y[0, 1], proj.words[0][0].detach(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="slots must be at most 9 with count"):
        _object_words(smollm2_tokenizer, slots=10, count=True)


def test_object_words_can_put_each_objects_position_before_its_words(smollm2_tokenizer):
    proj = _object_words(smollm2_tokenizer, slots=3, count=True, position_first=True)
    x = torch.zeros(1, GRID[0] * GRID[1], IN_DIM)
    _plant(proj, x, {11: (1, 0, 1, 0.5, 0.5), 18: (0, 1, 2, 0.25, 0.75)})
    assert proj.read(x) == ["2: 0 9 small blue square, 9 3 large red star"]
    y = proj(x)
    assert y.shape == (1, 1 + 3 * 5, OUT_DIM) and proj.num_tokens(24) == 16
    # after the count: digit 0, digit 9, then small, blue, square; the second object starts with 9 3
    expected = [proj.digits[0], proj.digits[9], proj.words[0][0], proj.words[1][1], proj.words[2][2]]
    torch.testing.assert_close(y[0, 1:6], torch.stack(expected).detach(), atol=1e-4, rtol=0)
    torch.testing.assert_close(y[0, 6:8], torch.stack([proj.digits[9], proj.digits[3]]).detach())


def test_object_words_reads_one_object_per_centre_and_the_surest_slots(smollm2_tokenizer):
    proj = _object_words(smollm2_tokenizer, slots=3)
    x = torch.zeros(1, GRID[0] * GRID[1], IN_DIM)
    # cells 0 and 1 vote for the same centre (one object seen twice, cell 1 less sure); cells 2 and 3 are
    # neighbours too but see two objects; cell 23 is a fourth object, the least sure: no slot left.
    _plant(
        proj,
        x,
        {0: (0, 0, 0, 0.5, 0.5), 1: (1, 1, 1, -0.5, 0.5), 2: (0, 1, 1, 0.5, 0.5), 3: (1, 0, 2, 0.9, 0.9),
         23: (1, 0, 0, 0.5, 0.5)},
    )  # fmt: skip
    x[:, 1, :9] *= 0.5
    x[:, 23, :9] *= 0.4
    assert proj.read(x) == ["small red circle 0 1, small blue star 4 1, large red square 6 2"]
    y = proj(torch.randn(4, GRID[0] * GRID[1], IN_DIM, requires_grad=True))
    y.sum().backward()  # the word mixtures pass gradients to the classifiers
    assert all(c.weight.grad is not None for c in proj.classifiers)


def test_object_words_starts_from_llm_embeddings_and_scene_heads(smollm2_tokenizer):
    table = torch.randn(len(smollm2_tokenizer), OUT_DIM)
    proj = _object_words(smollm2_tokenizer, table=table)
    seven = smollm2_tokenizer("7", add_special_tokens=False)["input_ids"]  # " 7" is " " + "7"
    torch.testing.assert_close(proj.digits[7].detach(), table[seven].mean(0))
    heads = {"size": torch.nn.Linear(IN_DIM, 3), "offset": torch.nn.Linear(IN_DIM, 2)}
    proj.init_classifiers(heads, {"size": ("large", "small")})
    torch.testing.assert_close(proj.classifiers[0].weight[1], heads["size"].weight[2])  # small
    torch.testing.assert_close(proj.offset.weight, heads["offset"].weight)


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"words": []}, "words must be a non-empty list"),
        ({"slots": 25}, "24 cells"),
        ({"position_bins": 11}, "position_bins must be 2..10"),
        ({"slot": 3}, r"options: unknown field\(s\) \['slot'\]"),
        ({"slots": "3"}, r"options.slots: expected int"),
    ],
)
def test_object_words_rejects_bad_settings(smollm2_tokenizer, fields, match):
    with pytest.raises(ValueError, match=match):
        make(
            ProjectorConfig(name="object_words", options={"words": OBJECT_WORDS, **fields}), smollm2_tokenizer
        )


def test_a_word_projector_saved_before_its_options_existed_loads():
    old = {"name": "object_words", "shuffle_factor": 2, "num_queries": 16, "words": [["red", "blue"]],
           "slots": 3, "position_bins": 8}  # fmt: skip
    new = upgrade_projector(dict(old))
    assert new["options"] == {"words": [["red", "blue"]], "slots": 3, "position_bins": 8, "shuffle_factor": 2}
    assert not {"words", "slots", "position_bins"} & set(new)
