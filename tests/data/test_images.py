"""Tests for image loading: modes, EXIF orientation, animation, sizes, and every failure kind."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from vistune.data.images import ImageError, check_image, load_image


def _pixel(im: Image.Image, xy=(0, 0)) -> tuple:
    return tuple(im.getpixel(xy))


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # transparent -> white
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 255)), (255, 0, 0)),
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (lambda: Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (lambda: Image.new("L", (4, 4), 77), (77, 77, 77)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),  # I;16
        (lambda: Image.fromarray(np.full((4, 4), 257 * 100, np.uint16)), (100, 100, 100)),
        (lambda: Image.fromarray(np.full((4, 4), 40000, np.int32), "I"), (156, 156, 156)),
        (lambda: Image.fromarray(np.full((4, 4), 12.4, np.float32), "F"), (12, 12, 12)),
    ],
)
def test_modes_become_rgb(tmp_path, make, expected):
    im = make()
    path = tmp_path / ("x.tiff" if im.mode in ("I", "F") else "x.png")
    im.save(path)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (4, 4)
    assert np.abs(np.subtract(_pixel(out), expected)).max() <= 1, (Image.open(path).mode, _pixel(out))


def test_palette_with_transparency_and_cmyk(tmp_path):
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 255] + [0, 0, 0] * 255)
    pal.save(tmp_path / "p.png", transparency=0)
    assert _pixel(load_image(tmp_path / "p.png")) == (255, 255, 255)
    pal.save(tmp_path / "opaque.png")
    assert _pixel(load_image(tmp_path / "opaque.png")) == (0, 0, 255)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "c.tiff")
    assert _pixel(load_image(tmp_path / "c.tiff")) == (255, 0, 0)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    im.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "e.jpg", exif=exif, quality=95)
    out = load_image(tmp_path / "e.jpg")
    assert out.size == (10, 20)
    assert _pixel(out, (5, 2))[0] > 200 and _pixel(out, (5, 17))[0] < 60  # red half now on top


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(tmp_path / "a.gif").n_frames == 2
    r, g, b = _pixel(load_image(tmp_path / "a.gif"))
    assert r > 200 and b < 50


def test_tiny_image(tmp_path):
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "t.png")
    assert load_image(tmp_path / "t.png").size == (1, 1) and check_image(tmp_path / "t.png") == (1, 1)


def test_pixel_limit_is_ours_not_pillows(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow alone would refuse this image
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no DecompressionBombWarning leaks out either
        assert load_image(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)
        assert check_image(tmp_path / "big.png", max_pixels=60_000) == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    for fn in (load_image, check_image):
        with pytest.raises(ImageError, match="60000 pixels exceeds the limit of 59999") as err:
            fn(tmp_path / "big.png", max_pixels=59_999)
        assert err.value.kind == "too-large image" and str(tmp_path / "big.png") in str(err.value)


def _broken_files(tmp_path):
    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    noisy.save(tmp_path / "n.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "n.png").read_bytes()[:2000])
    noisy.save(tmp_path / "n.jpg", quality=90)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "n.jpg").read_bytes()[:1500])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("this is not an image")
    return {
        "missing.png": "missing image",
        "empty.png": "zero-byte image",
        "text.png": "unreadable image",
        "cut.png": "truncated image",
        "cut.jpg": "truncated image",
    }


@pytest.mark.parametrize("fn", [load_image, check_image])
def test_failures_are_image_errors_naming_path_and_kind(tmp_path, fn):
    for name, kind in _broken_files(tmp_path).items():
        with pytest.raises(ImageError) as err:
            fn(tmp_path / name)
        assert err.value.kind == kind and str(tmp_path / name) in str(err.value), name
    for name in ("ok.png", "n.png", "n.jpg"):
        fn(tmp_path / name)  # intact files pass


def test_jpeg_with_trailing_bytes_passes_check(tmp_path):
    Image.new("RGB", (16, 16), (9, 9, 9)).save(tmp_path / "j.jpg")
    (tmp_path / "j.jpg").write_bytes((tmp_path / "j.jpg").read_bytes() + b"\x00\x00garbage")
    assert check_image(tmp_path / "j.jpg") == (16, 16)
