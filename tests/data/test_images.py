"""Tests for image loading: modes, EXIF orientation, animation, sizes, every failure kind, and that the
validation check decodes as training does without touching Pillow's global limit."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import broken_images
import numpy as np
import pytest
from PIL import Image, ImageFile, UnidentifiedImageError

from vistune.data import images
from vistune.data.images import DEFAULT_MAX_PIXELS, ImageError, check_image, load_image


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


# --- validation decodes as training does (issue 18, item 3) ---------------------------------------------


def _verdict(fn, path) -> str:
    try:
        fn(path)
    except ImageError as e:
        return e.kind
    return "ok"


def test_valid_chunks_with_bad_pixel_data_fail_the_check(tmp_path):
    """Chunk structure and CRCs are fine, the pixel data is not: the old probe (verify()) passed these."""
    cut = broken_images.cut_stream_png(tmp_path / "cut-stream.png")
    short = broken_images.short_png(tmp_path / "short.png")
    for path in (cut, short):
        Image.open(path).verify()  # what the old check ran: it raises nothing
        with pytest.raises(ImageError) as err:
            check_image(path)
        assert err.value.kind == "truncated image" and str(path) in str(err.value)
    assert "ends" in str(pytest.raises(ImageError, check_image, short).value)  # bytes early, counted
    with pytest.raises(ImageError, match="truncated image"):
        load_image(cut)  # training cannot decode it either


def test_what_passes_the_check_loads_and_what_fails_it_does_not(tmp_path):
    """A progressive JPEG cut at many points, with the EOI marker appended: check and load agree on each
    (the old check took any JPEG ending in EOI as complete; some of these fail to decode)."""
    cuts = broken_images.progressive_jpeg_cuts(tmp_path)
    verdicts = {p.name: (_verdict(check_image, p), _verdict(load_image, p)) for p in cuts}
    assert any(load != "ok" for _, load in verdicts.values())  # some cuts cannot be decoded
    for name, (check, load) in verdicts.items():
        assert check == load, name


def test_interlaced_png_complete_and_short(tmp_path):
    raw = broken_images.raw_rows(interlaced=True)
    (tmp_path / "ok.png").write_bytes(broken_images.png_bytes(raw, interlaced=True))
    assert check_image(tmp_path / "ok.png") == (64, 64)
    broken_images.short_png(tmp_path / "short.png", interlaced=True)
    assert _verdict(check_image, tmp_path / "short.png") == "truncated image"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "1", "P", "I;16"])
def test_complete_pngs_of_every_mode_pass_even_when_the_last_row_looks_like_the_marker(tmp_path, mode):
    """No false alarm from the last-row marker: a last row equal to it is recounted from the data."""
    im = Image.new(mode, (37, 5))
    if mode == "P":
        im.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])  # 256 colours: 8-bit indices
    im.save(tmp_path / "plain.png")
    assert check_image(tmp_path / "plain.png") == (37, 5)
    marker, _ = images._row_marker(mode, 37)
    im.paste(marker, (0, 4))
    im.save(tmp_path / "marked.png")
    assert Image.open(tmp_path / "marked.png").crop((0, 4, 37, 5)).tobytes() == marker.tobytes()
    assert check_image(tmp_path / "marked.png") == (37, 5)


def test_pillows_global_limit_is_never_changed(tmp_path, monkeypatch):
    """Another thread's Image.open must keep Pillow's bomb check while we open and decode: record the
    global at every plugin open and every decode during load_image and check_image."""
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.preinit()
    seen = []
    factory, accept = Image.OPEN["PNG"]

    def spying_factory(*args, **kwargs):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return factory(*args, **kwargs)

    real_load = ImageFile.ImageFile.load

    def spying_load(self):
        seen.append(Image.MAX_IMAGE_PIXELS)
        return real_load(self)

    monkeypatch.setitem(Image.OPEN, "PNG", (spying_factory, accept))
    monkeypatch.setattr(ImageFile.ImageFile, "load", spying_load)
    assert load_image(tmp_path / "big.png", max_pixels=60_000).size == (300, 200)
    assert check_image(tmp_path / "big.png", max_pixels=60_000) == (300, 200)
    assert seen and set(seen) == {1000}


def test_open_header_reads_a_bomb_header_without_decoding_or_pillows_check():
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + broken_images._chunk(b"IHDR", header) + broken_images._chunk(b"IEND", b"")
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))  # Pillow's own check, untouched for everyone else
    assert images.open_header(io.BytesIO(data)).size == (100_000, 100_000)
    with pytest.raises(UnidentifiedImageError):
        images.open_header(io.BytesIO(data), formats=["JPEG", "GIF"])
    with pytest.raises(ImageError, match="too-large image"):
        fp = io.BytesIO(data)
        images._header(fp, Path("bomb.png"), DEFAULT_MAX_PIXELS)


def test_pillows_limit_inside_a_decoder_is_a_too_large_image(tmp_path, monkeypatch):
    """TIFF checks Pillow's global limit again when decoding: an ImageError, not a raw exception."""
    Image.new("RGB", (300, 200)).save(tmp_path / "big.tiff")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    for fn in (load_image, check_image):
        with pytest.raises(ImageError, match="MAX_IMAGE_PIXELS") as err:
            fn(tmp_path / "big.tiff", max_pixels=10**6)
        assert err.value.kind == "too-large image"


def test_open_header_with_formats_loads_the_plugins_it_names(tmp_path):
    """As `Image.open(..., formats=...)`: a plugin outside Pillow's preinit set (WebP) is found too, in a
    fresh interpreter where nothing has imported it yet."""
    Image.new("RGB", (5, 3), (1, 2, 3)).save(tmp_path / "x.webp")
    code = (
        "import sys; from vistune.data.images import open_header; "
        "im = open_header(open(sys.argv[1], 'rb'), formats=('PNG', 'JPEG', 'WEBP', 'GIF', 'BMP')); "
        "print(im.format, im.size)"
    )
    argv = [sys.executable, "-c", code, str(tmp_path / "x.webp")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "WEBP (5, 3)", out.stderr
