"""Image preprocessing: squash, pad and crop reproduce transformers' own CLIP and LLaVA image processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vistune.config import VisionConfig
from vistune.model.preprocess import pad_to_square, preprocess, resize_and_crop
from vistune.model.vision import CLIP_MEAN, CLIP_STD, build_vision_tower

# transformers 5 without torchvision: CLIPImageProcessor / LlavaImageProcessor fall back (with a warning) to
# these PIL backends; older releases name the PIL-based processors without the suffix.
try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ClipProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as LlavaProcessor
except ImportError:  # pragma: no cover - transformers 4
    from transformers import CLIPImageProcessor as ClipProcessor
    from transformers import LlavaImageProcessor as LlavaProcessor

S = 16
SIZES = [(50, 20), (20, 50), (51, 20), (21, 50), (17, 33), (30, 30)]  # (width, height); odd margins too


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random RGB pixels: every pixel differs, so an off-by-one crop or pad offset shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference(mode: str, size: int = S, mean=CLIP_MEAN, std=CLIP_STD):
    """The transformers processor that `mode` claims to reproduce."""
    norm = dict(image_mean=list(mean), image_std=list(std))
    if mode == "crop":
        return ClipProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm)
    if mode == "pad":
        return LlavaProcessor(
            do_pad=True, size={"shortest_edge": size}, crop_size={"height": size, "width": size}, **norm
        )
    return ClipProcessor(size={"height": size, "width": size}, do_center_crop=False, **norm)


def _theirs(mode: str, images: list[Image.Image], **kwargs) -> torch.Tensor:
    return _reference(mode, **kwargs)(images, return_tensors="pt")["pixel_values"]


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
@pytest.mark.parametrize("width, height", SIZES)
def test_mode_equals_transformers_processor(mode, width, height):
    image = _noise(width, height, seed=width * 100 + height)
    ours = preprocess([image], mode, S, CLIP_MEAN, CLIP_STD)
    theirs = _theirs(mode, [image])
    assert ours.shape == theirs.shape == (1, 3, S, S) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_batch_of_mixed_shapes_and_other_norm(mode):
    """A batch keeps its order; a different size and mean/std (SigLIP's) match too."""
    images = [_noise(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    mean = std = (0.5, 0.5, 0.5)
    ours = preprocess(images, mode, 24, mean, std)
    theirs = _theirs(mode, images, size=24, mean=mean, std=std)
    assert ours.shape == (len(images), 3, 24, 24)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_modes_differ_on_a_non_square_image():
    """The comparison above can fail: on a wide image the three modes give three different inputs."""
    image = _noise(50, 20)
    out = {m: preprocess([image], m, S, CLIP_MEAN, CLIP_STD) for m in ("squash", "pad", "crop")}
    assert not torch.allclose(out["squash"], out["pad"], atol=1e-2)
    assert not torch.allclose(out["squash"], out["crop"], atol=1e-2)
    assert not torch.allclose(out["pad"], out["crop"], atol=1e-2)


def test_pad_fills_with_truncated_mean_and_centres_the_image():
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    square = pad_to_square(image, CLIP_MEAN)
    assert square.size == (40, 40)
    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    assert fill == (122, 116, 104)  # truncated, as LLaVA's expand2square and transformers do
    px = np.asarray(square)
    assert (px[:15] == fill).all() and (px[25:] == fill).all()  # 30 rows of margin: 15 above, 15 below
    assert (px[15:25] == (255, 0, 0)).all()
    assert pad_to_square(_noise(12, 12), CLIP_MEAN).size == (12, 12)


def test_crop_keeps_the_centre_of_the_long_side():
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    image.paste((255, 255, 255), (20, 0, 40, 20))  # white centre third, blue sides
    out = np.asarray(resize_and_crop(image, S))
    assert out.shape == (S, S, 3)
    assert (out[:, 4:12] == 255).all()  # the centre stays white after bicubic resizing
    assert resize_and_crop(_noise(20, 50), S).size == (S, S)


@pytest.mark.parametrize("size", [S, 12])
def test_all_modes_agree_on_a_square_image(size):
    image = _noise(30, 30, seed=3)
    out = [preprocess([image], m, size, CLIP_MEAN, CLIP_STD) for m in ("squash", "pad", "crop")]
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)
    torch.testing.assert_close(out[0], out[2], rtol=0, atol=0)


def test_grayscale_image_is_converted_to_rgb_like_transformers():
    image = Image.fromarray(np.random.default_rng(5).integers(0, 256, (20, 50), dtype=np.uint8), "L")
    for mode in ("squash", "pad", "crop"):
        torch.testing.assert_close(
            preprocess([image], mode, S, CLIP_MEAN, CLIP_STD), _theirs(mode, [image]), rtol=0, atol=1e-5
        )


def test_unknown_mode_raises_naming_it():
    with pytest.raises(ValueError, match="'letterbox'.*squash, pad, crop"):
        preprocess([_noise(20, 10)], "letterbox", S, CLIP_MEAN, CLIP_STD)
    with pytest.raises(ValueError, match="'letterbox'"):
        VisionConfig(preprocess="letterbox")


@pytest.mark.parametrize("mode", ["squash", "pad", "crop"])
def test_tower_preprocess_uses_its_mode_and_clip_norm(mode):
    cfg = VisionConfig(
        kind="clip", preprocess=mode, image_size=S, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
        intermediate_size=32,
    )  # fmt: skip
    tower = build_vision_tower(cfg)
    images = [_noise(50, 20, seed=7), _noise(20, 50, seed=8)]
    pixels = tower.preprocess(images)
    torch.testing.assert_close(pixels, _theirs(mode, images), rtol=0, atol=1e-5)
    assert tower(pixels).shape == (2, 16, 16)
