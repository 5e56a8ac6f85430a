"""Position codes: each grid token's row and column appended, what they tell apart, and where they apply."""

from __future__ import annotations

import pytest
import torch

from vistune.config import ProjectorConfig
from vistune.model.positions import GridPositions, sincos_codes
from vistune.model.projector import ProjectorContext, build_projector


def test_codes_tell_every_cell_apart_and_keep_rows_and_columns():
    codes = sincos_codes((3, 4), 16)
    assert codes.shape == (12, 16)
    assert torch.cdist(codes, codes).fill_diagonal_(1.0).min() > 0.1  # every cell has its own code
    grid = codes.view(3, 4, 16)
    torch.testing.assert_close(grid[0, :, :8], grid[0, :1, :8].expand(4, 8))  # a row shares its row half
    torch.testing.assert_close(grid[:, 0, 8:], grid[:1, 0, 8:].expand(3, 8))  # a column its column half


def test_same_place_same_code_on_any_grid():
    """Codes are of fractions of the image: column 0 of 2 and column 1 of 6 are both centred at 1/4."""
    coarse, fine = sincos_codes((1, 2), 8), sincos_codes((3, 6), 8)
    torch.testing.assert_close(coarse[0, 4:], fine[1, 4:])  # the column half
    torch.testing.assert_close(sincos_codes((6, 1), 8)[1, :4], sincos_codes((2, 5), 8)[0, :4])  # the row half


def test_grid_positions_append_codes_and_zero_a_cls_token():
    positions = GridPositions((2, 2), 8, tokens=5)  # CLS first, as CLIP's features are
    x = torch.randn(3, 5, 6)
    y = positions(x)
    assert y.shape == (3, 5, 14)
    torch.testing.assert_close(y[..., :6], x)
    assert (y[:, 0, 6:] == 0).all()
    torch.testing.assert_close(y[0, 1:, 6:], sincos_codes((2, 2), 8))
    assert not positions.state_dict()  # rebuilt from the grid: nothing to save


def test_resampler_tells_mirrored_images_apart_only_with_codes():
    """Learned queries attend to the tokens as a set: swapping the left and right tokens of every row
    changes nothing without codes, and changes the output with them."""
    torch.manual_seed(0)
    grid, dim = (2, 2), 8
    x = torch.randn(1, 4, dim)
    mirrored = x.view(1, 2, 2, dim).flip(2).reshape(1, 4, dim)
    plain = build_projector(ProjectorConfig(name="resampler", num_queries=3),
                            ProjectorContext(dim, 16, grid, torch.zeros(1, 16), None))  # fmt: skip
    torch.testing.assert_close(plain(x), plain(mirrored))
    coded = build_projector(ProjectorConfig(name="resampler", num_queries=3),
                            ProjectorContext(dim + 8, 16, grid, torch.zeros(1, 16), None))  # fmt: skip
    positions = GridPositions(grid, 8, 4)
    assert (coded(positions(x)) - coded(positions(mirrored))).abs().max() > 1e-3


@pytest.mark.parametrize("bad", [2, 6, -4])
def test_position_codes_must_be_a_multiple_of_four(bad):
    with pytest.raises(ValueError, match="position_codes"):
        ProjectorConfig(position_codes=bad)


@pytest.mark.parametrize("projector", ["linear", "mlp2x_gelu", "pixel_shuffle", "resampler"])
def test_every_built_in_projector_takes_codes_and_saves_and_loads(tiny_vlm, projector, tmp_path):
    from vistune.config import ModelConfig
    from vistune.model.vlm import load_vlm, save_vlm

    model = tiny_vlm("resnet", projector)
    cfg = ModelConfig(**{**model.cfg.__dict__})
    cfg.projector = ProjectorConfig(name=projector, num_queries=3, position_codes=8)
    from vistune.model.vlm import build_vlm

    torch.manual_seed(0)
    coded = build_vlm(cfg).eval()
    pixels = torch.randn(2, 3, 16, 16)
    out = coded.encode_images(pixels)
    assert out.shape == model.encode_images(pixels).shape
    save_vlm(coded, tmp_path / "m")
    again = load_vlm(tmp_path / "m")
    assert again.cfg.projector.position_codes == 8
    torch.testing.assert_close(again.encode_images(pixels), out)


def test_the_llava_format_refuses_position_codes_naming_the_field():
    from vistune.config import ModelConfig, VisionConfig
    from vistune.interop.llava import check_exportable

    cfg = ModelConfig(vision=VisionConfig(kind="clip"), projector=ProjectorConfig(name="mlp2x_gelu"))
    check_exportable(cfg)  # the same model without codes exports
    cfg.projector.position_codes = 32
    with pytest.raises(ValueError, match=r"position codes \(projector.position_codes: 32\)"):
        check_exportable(cfg)
