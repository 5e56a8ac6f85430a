"""Train-time augmentation of preprocessed image batches that keeps every target true.

Photometric jitter (brightness, contrast, pixel noise) is kept small enough that no named colour turns
into another; a shrink (the image made smaller and put anywhere on a canvas of the mean colour) keeps a
class label true, but not targets tied to places, so only classify stages take it; a horizontal flip and
a grey-scale copy and a strong blur change what may be asked about an image, so they come back as masks
(`Drawn`) that the objective uses: it mirrors whatever depends on left and right for the flipped images,
drops the colour targets of the grey ones and the shape targets of the blurred ones. A tower that must
tell shapes apart without colour, and colours apart without shape, learns features for each that do not
lean on the other: what lets it read a colour-shape pair it never saw.

It runs on the stage's device, on the normalised pixels a tower's `preprocess` returns. The random draws
come from torch's default CPU generator, which checkpoints save and restore, so a resumed run draws
exactly the augmentations the uninterrupted run drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from vistune.config import Augment

# ITU-R BT.601 luma weights: the grey a person sees in an RGB colour.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Drawn:
    """Which images of a batch were flipped, turned grey and blurred, as (B,) bool tensors."""

    flipped: torch.Tensor
    grey: torch.Tensor
    blurred: torch.Tensor


def _draw(n: int, probability: float) -> torch.Tensor:
    return torch.rand(n) < probability


def _uniform(n: int, spread: float) -> torch.Tensor:
    """(n,) factors in [1 - spread, 1 + spread]."""
    return 1.0 + spread * (2.0 * torch.rand(n) - 1.0)


def augment(
    pixels: torch.Tensor, aug: Augment, mean: Sequence[float], std: Sequence[float]
) -> tuple[torch.Tensor, Drawn]:
    """A randomly augmented copy of a (B, 3, H, W) batch normalised with `mean`/`std`, and what was drawn.

    Every draw is made for every image whatever the settings, so turning one knob on does not change the
    random draws of the others (and a config's augmentations depend only on the seed and the step).
    """
    n, device = pixels.shape[0], pixels.device
    flipped, grey, blurred = _draw(n, aug.flip), _draw(n, aug.grayscale), _draw(n, aug.blur)
    brightness, contrast = _uniform(n, aug.brightness), _uniform(n, aug.contrast)
    noise_seed = int(torch.randint(0, 2**31 - 1, ()))
    if aug.shrink > 0:  # its draws come from the noise seed: other knobs' draws stay as they were
        pixels = _shrink(pixels, aug.shrink, torch.Generator().manual_seed(noise_seed + 1))
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=device).view(1, 3, 1, 1)
    x = pixels * std_t + mean_t  # back to 0..1 RGB
    x = torch.where(flipped.to(device).view(-1, 1, 1, 1), x.flip(-1), x)
    luma = (x * torch.tensor(LUMA, dtype=x.dtype, device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.where(grey.to(device).view(-1, 1, 1, 1), luma.expand_as(x), x)
    x = torch.where(blurred.to(device).view(-1, 1, 1, 1), _blur(x), x)
    centre = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - centre) * contrast.to(device, x.dtype).view(-1, 1, 1, 1) + centre
    x = x * brightness.to(device, x.dtype).view(-1, 1, 1, 1)
    if aug.noise > 0:
        generator = torch.Generator(device=device).manual_seed(noise_seed)
        x = x + aug.noise * torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    drawn = Drawn(flipped=flipped.to(device), grey=grey.to(device), blurred=blurred.to(device))
    return (x.clamp(0, 1) - mean_t) / std_t, drawn


def _shrink(pixels: torch.Tensor, shrink: float, generator: torch.Generator) -> torch.Tensor:
    """Each normalised image scaled by a factor in [1 - shrink, 1] and moved to a random place where it
    fits whole; the uncovered canvas is 0, the normalisation mean (the colour `pad` fills with)."""
    n = pixels.shape[0]
    scale = 1.0 - shrink * torch.rand(n, generator=generator)
    shift = (1.0 - scale)[:, None] * (2.0 * torch.rand(n, 2, generator=generator) - 1.0)  # x, y in [-1, 1]
    # grid_sample reads output point p at input point (p - shift) / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / scale
    theta[:, :, 2] = -shift / scale[:, None]
    theta = theta.to(pixels.device, pixels.dtype)
    grid = F.affine_grid(theta, list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Two box filters of a tenth of the image side (about a Gaussian of that sigma): shapes turn into
    blobs of their colour, which stay where the objects are."""
    k = max(3, x.shape[-1] // 10) | 1
    for _ in range(2):
        x = F.avg_pool2d(F.pad(x, [k // 2] * 4, mode="replicate"), k, stride=1)
    return x


def mirror_grid(values: torch.Tensor, grid: tuple[int, int], flipped: torch.Tensor) -> torch.Tensor:
    """Per-cell values (B, h*w, ...) of images that were flipped, mirrored left to right (row-major cells)."""
    h, w = grid
    shaped = values.view(values.shape[0], h, w, *values.shape[2:])
    mask = flipped.view(-1, *([1] * (shaped.dim() - 1)))
    return torch.where(mask, shaped.flip(2), shaped).view_as(values)
