"""Image preprocessing for vision towers: PIL images -> normalised (B, 3, S, S) float32 pixels.

Three ways to make the tower's square input of side S (`VisionConfig.preprocess`):

- `squash`: resize the whole image to S x S; nothing is cut, the aspect ratio is lost.
- `pad` (the default): pad to a square with the normalisation mean colour, the image centred, then
  resize; nothing is cut and shapes keep their proportions. LLaVA-1.5's `expand2square`, and
  transformers' `LlavaImageProcessor(do_pad=True)`.
- `crop`: resize the shortest edge to S, then cut the centre S x S; what lies outside is lost.
  CLIP's own processor.

Resizing is bicubic through Pillow, as in the transformers processors, then pixels are scaled to
[0, 1] and normalised with the tower's mean and std. On a square image all three are the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

Mean = Sequence[float]


def pad_to_square(image: Image.Image, mean: Mean) -> Image.Image:
    """The image centred on a square of its longer side, filled with the mean colour (0..255, truncated)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    fill = tuple(int(m * 255) for m in mean)
    square = Image.new("RGB", (side, side), fill)
    square.paste(image, ((side - w) // 2, (side - h) // 2))
    return square


def resize_and_crop(image: Image.Image, size: int) -> Image.Image:
    """Shortest edge to `size` (the longer one scaled and truncated), then the centre size x size."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    image = image.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_square(image: Image.Image, mode: str, size: int, mean: Mean) -> Image.Image:
    """One RGB image as the size x size square that `mode` makes of it."""
    image = image.convert("RGB")
    if mode == "crop":
        return resize_and_crop(image, size)
    if mode == "pad":
        image = pad_to_square(image, mean)
    elif mode != "squash":
        raise ValueError(f"preprocess mode {mode!r} is not one of squash, pad, crop")
    return image.resize((size, size), Image.Resampling.BICUBIC)


def preprocess(images: Sequence[Image.Image], mode: str, size: int, mean: Mean, std: Mean) -> torch.Tensor:
    """(B, 3, size, size) float32 pixels: squared by `mode`, scaled to [0, 1], normalised."""
    arrays = [np.asarray(to_square(im, mode, size, mean)) for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (pixels - mean_t) / std_t
