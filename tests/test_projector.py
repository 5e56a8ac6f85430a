"""Projectors: shapes and token counts, pixel-shuffle neighbourhoods, and builder errors."""

from __future__ import annotations

import pytest
import torch

from vistune.config import ProjectorConfig
from vistune.projector import PROJECTORS, build_projector

IN_DIM, OUT_DIM, GRID = 12, 20, (4, 6)


@pytest.mark.parametrize(
    "name, expected_tokens",
    [("linear", 24), ("mlp2x_gelu", 24), ("pixel_shuffle", 6), ("resampler", 5)],
)
def test_output_shape_and_num_tokens(name, expected_tokens):
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(name=name, num_queries=5), IN_DIM, OUT_DIM, GRID)
    x = torch.randn(3, GRID[0] * GRID[1], IN_DIM)
    y = proj(x)
    assert y.shape == (3, expected_tokens, OUT_DIM)
    assert proj.num_tokens(GRID[0] * GRID[1]) == expected_tokens
    assert torch.isfinite(y).all()
    y.sum().backward()  # every parameter is used and receives a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in proj.parameters())


@pytest.mark.parametrize("name", ["linear", "mlp2x_gelu", "pixel_shuffle"])
def test_tokenwise_projectors_keep_images_independent(name):
    """Image b's output depends on image b only (no mixing across the batch)."""
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(name=name), IN_DIM, OUT_DIM, GRID)
    x = torch.randn(2, 24, IN_DIM)
    torch.testing.assert_close(proj(x)[1:], proj(x[1:]))


def test_pixel_shuffle_groups_2x2_neighbours():
    """Token k of an h x w grid holds value k; each output token must hold exactly one 2x2 block."""
    h, w, f = 4, 6, 2
    proj = build_projector(ProjectorConfig(name="pixel_shuffle", shuffle_factor=f), 1, f * f, (h, w))
    with torch.no_grad():  # make the projection the identity, so outputs are the merged inputs
        proj.proj.weight.copy_(torch.eye(f * f))
        proj.proj.bias.zero_()
    x = torch.arange(h * w, dtype=torch.float32).view(1, h * w, 1)
    y = proj(torch.cat([x, x + 100]))  # two images: the second is offset by 100
    assert y.shape == (2, (h // f) * (w // f), f * f)
    for i in range(h // f):
        for j in range(w // f):
            block = sorted((f * i + a) * w + (f * j + b) for a in range(f) for b in range(f))
            token = i * (w // f) + j  # output tokens are row-major over the coarse grid
            assert sorted(y[0, token].tolist()) == block
            assert sorted(y[1, token].tolist()) == [v + 100 for v in block]
    # within a token, the order is (row, column) of the block: top-left, top-right, bottom-left, ...
    assert y[0, 0].tolist() == [0, 1, w, w + 1]


def test_pixel_shuffle_factor_3():
    proj = build_projector(ProjectorConfig(name="pixel_shuffle", shuffle_factor=3), 2, 8, (3, 6))
    assert proj(torch.randn(1, 18, 2)).shape == (1, 2, 8) and proj.num_tokens(18) == 2


@pytest.mark.parametrize("grid", [(3, 4), (4, 5), None])
def test_pixel_shuffle_rejects_indivisible_grid(grid):
    with pytest.raises(ValueError, match="not divisible by factor 2"):
        build_projector(ProjectorConfig(name="pixel_shuffle"), IN_DIM, OUT_DIM, grid)


def test_pixel_shuffle_rejects_wrong_token_count():
    proj = build_projector(ProjectorConfig(name="pixel_shuffle"), IN_DIM, OUT_DIM, GRID)
    with pytest.raises(ValueError, match="expected 24 tokens"):
        proj(torch.randn(1, 25, IN_DIM))  # e.g. a CLS token left in


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'qformer' is unknown") as err:
        build_projector(ProjectorConfig(name="qformer"), IN_DIM, OUT_DIM, GRID)
    for name in PROJECTORS:
        assert name in str(err.value)


def test_resampler_count_is_independent_of_input_length():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(name="resampler", num_queries=7), IN_DIM, OUT_DIM, GRID)
    for n in (1, 24, 50):
        assert proj(torch.randn(2, n, IN_DIM)).shape == (2, 7, OUT_DIM) and proj.num_tokens(n) == 7


WORDS = [["red", "blue"], ["circle", "star", "square"]]


def test_visual_words_shape_and_block_sum():
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(name="visual_words", words=WORDS), IN_DIM, OUT_DIM, GRID)
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
    proj = build_projector(ProjectorConfig(name="visual_words", words=WORDS), IN_DIM, OUT_DIM, GRID)
    table = torch.randn(len(smollm2_tokenizer), OUT_DIM)
    proj.bind(table, smollm2_tokenizer)
    star = smollm2_tokenizer(" star", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(proj.words[1][1].detach(), table[star].mean(0))
    # scene heads list classes as none + their own vocabulary order; the projector reorders by word
    heads = {"shape": torch.nn.Linear(IN_DIM, 4), "color": torch.nn.Linear(IN_DIM, 3)}
    vocab = {"shape": ("square", "circle", "star"), "color": ("blue", "red")}
    proj.init_classifiers(heads, vocab)
    torch.testing.assert_close(proj.classifiers[1].weight[1], heads["shape"].weight[2])  # circle
    torch.testing.assert_close(proj.classifiers[1].weight[3], heads["shape"].weight[1])  # square
    torch.testing.assert_close(proj.classifiers[0].weight[1], heads["color"].weight[2])  # red


def test_visual_words_needs_words():
    with pytest.raises(ValueError, match="words"):
        build_projector(ProjectorConfig(name="visual_words"), IN_DIM, OUT_DIM, GRID)


OBJECT_WORDS = [["small", "large"], ["red", "blue"], ["circle", "star", "square"]]


def _object_words(slots: int = 3, bins: int = 10):
    cfg = ProjectorConfig(name="object_words", words=OBJECT_WORDS, slots=slots, position_bins=bins)
    return build_projector(cfg, IN_DIM, OUT_DIM, GRID)


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


def test_object_words_reads_objects_left_to_right_with_digit_positions():
    proj = _object_words(slots=3)
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


def test_object_words_reads_one_object_per_centre_and_the_surest_slots():
    proj = _object_words(slots=3)
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
    proj = _object_words()
    table = torch.randn(len(smollm2_tokenizer), OUT_DIM)
    proj.bind(table, smollm2_tokenizer)
    seven = smollm2_tokenizer("7", add_special_tokens=False)["input_ids"]  # " 7" is " " + "7"
    torch.testing.assert_close(proj.digits[7].detach(), table[seven].mean(0))
    heads = {"size": torch.nn.Linear(IN_DIM, 3), "offset": torch.nn.Linear(IN_DIM, 2)}
    proj.init_classifiers(heads, {"size": ("large", "small")})
    torch.testing.assert_close(proj.classifiers[0].weight[1], heads["size"].weight[2])  # small
    torch.testing.assert_close(proj.offset.weight, heads["offset"].weight)


@pytest.mark.parametrize(
    "fields, match", [({"words": []}, "words"), ({"slots": 25}, "24 cells"), ({"position_bins": 11}, "bins")]
)
def test_object_words_rejects_bad_settings(fields, match):
    with pytest.raises(ValueError, match=match):
        cfg = ProjectorConfig(**{"name": "object_words", "words": OBJECT_WORDS, **fields})
        build_projector(cfg, IN_DIM, OUT_DIM, GRID)
