"""Train-time augmentation: what each knob does to the pixels, its draws, and its config checks."""

from __future__ import annotations

import pytest
import torch

from vistune.config import Augment, Stage
from vistune.data.augment import LUMA, augment, mirror_grid

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _pixels(n: int = 4, size: int = 6) -> torch.Tensor:
    raw = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    return (raw - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _raw(pixels: torch.Tensor) -> torch.Tensor:
    return pixels * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


def test_all_zero_changes_nothing():
    pixels = _pixels()
    out, drawn = augment(pixels, Augment(), MEAN, STD)
    torch.testing.assert_close(out, pixels)
    assert not (drawn.flipped.any() or drawn.grey.any() or drawn.blurred.any())


def test_flip_mirrors_and_grey_keeps_luma():
    pixels = _pixels()
    flipped, drawn = augment(pixels, Augment(flip=1.0), MEAN, STD)
    assert drawn.flipped.all()
    torch.testing.assert_close(flipped, pixels.flip(-1))
    grey, drawn = augment(pixels, Augment(grayscale=1.0), MEAN, STD)
    assert drawn.grey.all()
    luma = (_raw(pixels) * torch.tensor(LUMA).view(1, 3, 1, 1)).sum(1)
    for channel in range(3):
        torch.testing.assert_close(_raw(grey)[:, channel], luma)


def test_blur_hides_detail_but_keeps_the_mean_colour():
    pixels = _pixels(n=2, size=40)
    out, drawn = augment(pixels, Augment(blur=1.0), MEAN, STD)
    assert drawn.blurred.all()
    raw, before = _raw(out), _raw(pixels)
    assert raw.std() < 0.5 * before.std()  # uniform noise loses most of its variation
    torch.testing.assert_close(raw.mean(dim=(2, 3)), before.mean(dim=(2, 3)), atol=0.02, rtol=0)


def test_photometric_jitter_stays_in_range_and_is_bounded():
    pixels = _pixels(n=64)
    out, _ = augment(pixels, Augment(brightness=0.1, contrast=0.1, noise=0.02), MEAN, STD)
    raw, before = _raw(out), _raw(pixels)
    assert raw.min() >= 0 and raw.max() <= 1 + 1e-6
    assert not torch.allclose(raw, before)
    # brightness and contrast of 10% and 2% noise move no pixel by more than a quarter of the range
    assert (raw - before).abs().max() < 0.25


def test_draws_come_from_the_seeded_generator_and_do_not_depend_on_other_knobs():
    pixels = _pixels(n=16)
    torch.manual_seed(7)
    a, drawn_a = augment(pixels, Augment(flip=0.5, noise=0.05), MEAN, STD)
    torch.manual_seed(7)
    b, _ = augment(pixels, Augment(flip=0.5, noise=0.05), MEAN, STD)
    torch.testing.assert_close(a, b)
    torch.manual_seed(7)
    _, drawn_c = augment(pixels, Augment(flip=0.5, grayscale=0.5, brightness=0.2), MEAN, STD)
    assert torch.equal(drawn_a.flipped, drawn_c.flipped)  # turning other knobs on changes no flip
    assert 0 < int(drawn_a.flipped.sum()) < 16


def test_mirror_grid_flips_the_cells_of_flipped_images_only():
    values = torch.arange(2 * 2 * 3).view(2, 6)[..., None]  # 2 images, a 2 x 3 grid
    out = mirror_grid(values, (2, 3), torch.tensor([True, False]))
    assert out[0, :, 0].tolist() == [2, 1, 0, 5, 4, 3]
    assert torch.equal(out[1], values[1])


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"flip": 1.5}, "augment.flip is a probability"),
        ({"noise": -0.1}, r"augment.noise must be in \[0, 0.5\]"),
        ({"brightness": 0.9}, r"augment.brightness must be in \[0, 0.5\]"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        Augment(**fields)


def test_stages_whose_targets_augmentation_would_falsify_refuse_it():
    for kind in ("vlm", "contrastive"):
        with pytest.raises(ValueError, match=r"options: unknown field\(s\) \['augment'\]"):
            Stage(name="s", kind=kind, options={"augment": {"flip": 0.5}})
    assert Stage(name="s", kind="classify", options={"augment": {"flip": 0.5}}).options.augment.flip == 0.5
    assert Stage(name="s", kind="scene", options={"augment": {"flip": 0.5}}).options.augment.flip == 0.5


def test_shrink_keeps_the_image_whole_smaller_on_the_mean_colour():
    pixels = torch.zeros(8, 3, 32, 32)
    pixels[:, :, 8:24, 8:24] = 1.0  # a square in the middle; 0 is the mean colour after normalisation
    torch.manual_seed(0)
    out, _ = augment(pixels, Augment(shrink=0.5), MEAN, STD)
    # no pixel leaves the frame: the square's mass shrinks by the square of a factor in [0.5, 1]
    mass = (out > 0.5).float().sum(dim=(1, 2, 3)) / (pixels > 0.5).float().sum(dim=(1, 2, 3))
    assert (mass > 0.2).all() and (mass < 1.05).all() and (mass < 0.9).any()
    # the border stays the mean colour (0): the image moved and shrank, nothing was drawn around it
    assert out[:, :, 0, :].abs().max() < 1e-6 and out[:, :, -1, :].abs().max() < 1e-6


def test_shrink_draws_from_the_noise_seed_so_other_knobs_draw_as_before():
    pixels = _pixels(n=6)
    torch.manual_seed(5)
    _, before = augment(pixels, Augment(flip=0.5, grayscale=0.5), MEAN, STD)
    state_before = torch.get_rng_state()
    torch.manual_seed(5)
    _, after = augment(pixels, Augment(flip=0.5, grayscale=0.5, shrink=0.4), MEAN, STD)
    assert torch.equal(before.flipped, after.flipped) and torch.equal(before.grey, after.grey)
    assert torch.equal(torch.get_rng_state(), state_before)  # later batches draw as before too
    with pytest.raises(ValueError, match="shrink"):
        Augment(shrink=0.9)
