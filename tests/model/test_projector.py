"""Projectors: shapes and token counts, pixel-shuffle neighbourhoods, and builder errors."""

from __future__ import annotations

import pytest
import torch

from vistune.config import ProjectorConfig
from vistune.model.projector import PROJECTORS, ProjectorContext, build_projector, upgrade_projector

IN_DIM, OUT_DIM, GRID = 12, 20, (4, 6)


def make(cfg: ProjectorConfig, in_dim: int = IN_DIM, out_dim: int = OUT_DIM, grid=GRID):
    """Build a core projector; they use neither the LLM's word embeddings nor its tokenizer."""
    return build_projector(cfg, ProjectorContext(in_dim, out_dim, grid, torch.zeros(1, out_dim), None))


@pytest.mark.parametrize(
    "name, expected_tokens",
    [("linear", 24), ("mlp2x_gelu", 24), ("pixel_shuffle", 6), ("resampler", 5)],
)
def test_output_shape_and_num_tokens(name, expected_tokens):
    torch.manual_seed(0)
    proj = make(ProjectorConfig(name=name, num_queries=5))
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
    proj = make(ProjectorConfig(name=name))
    x = torch.randn(2, 24, IN_DIM)
    torch.testing.assert_close(proj(x)[1:], proj(x[1:]))


def test_pixel_shuffle_groups_2x2_neighbours():
    """Token k of an h x w grid holds value k; each output token must hold exactly one 2x2 block."""
    h, w, f = 4, 6, 2
    proj = make(ProjectorConfig(name="pixel_shuffle", shuffle_factor=f), 1, f * f, (h, w))
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
    proj = make(ProjectorConfig(name="pixel_shuffle", shuffle_factor=3), 2, 8, (3, 6))
    assert proj(torch.randn(1, 18, 2)).shape == (1, 2, 8) and proj.num_tokens(18) == 2


@pytest.mark.parametrize("grid", [(3, 4), (4, 5), None])
def test_pixel_shuffle_rejects_indivisible_grid(grid):
    with pytest.raises(ValueError, match="not divisible by factor 2"):
        make(ProjectorConfig(name="pixel_shuffle"), grid=grid)


def test_pixel_shuffle_rejects_wrong_token_count():
    proj = make(ProjectorConfig(name="pixel_shuffle"))
    with pytest.raises(ValueError, match="expected 24 tokens"):
        proj(torch.randn(1, 25, IN_DIM))  # e.g. a CLS token left in


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="'qformer' is unknown") as err:
        make(ProjectorConfig(name="qformer"))
    for name in PROJECTORS:
        assert name in str(err.value)


def test_resampler_count_is_independent_of_input_length():
    torch.manual_seed(0)
    proj = make(ProjectorConfig(name="resampler", num_queries=7))
    for n in (1, 24, 50):
        assert proj(torch.randn(2, n, IN_DIM)).shape == (2, 7, OUT_DIM) and proj.num_tokens(n) == 7


def test_options_are_refused_by_projectors_that_take_none():
    with pytest.raises(ValueError, match="'mlp2x_gelu' takes no options; got \\['words'\\]"):
        make(ProjectorConfig(name="mlp2x_gelu", options={"words": [["red"]]}))


def test_a_projector_config_saved_by_an_earlier_version_loads():
    """Before extension projectors took their settings from `options`, every saved projector config held
    `words`, `slots` and `position_bins`; the built-in projectors drop them."""
    old = {"name": "mlp2x_gelu", "shuffle_factor": 2, "num_queries": 16, "words": [], "slots": 6,
           "position_bins": 10}  # fmt: skip
    assert upgrade_projector(dict(old)) == {"name": "mlp2x_gelu", "shuffle_factor": 2, "num_queries": 16}
    assert ProjectorConfig(**upgrade_projector(dict(old))).name == "mlp2x_gelu"
