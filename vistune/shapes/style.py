"""How a shapes-world scene is drawn (domain randomisation): sampled per scene, recorded in its graph.

A scene's `style` says how its canvas was drawn: `{"canvas": 80, "background": "lines", "supersample": 4,
"outline": "dark", "star_inner": 0.45}`. Each object records its own `rgb` (a shade of its named colour)
and `aspect` (how much one axis is squeezed). The knobs:

- canvas: the side of the square image in pixels (square, because the scene objective and the
  model's padding both map x/width and y/height onto a square grid);
- background: a pale base colour drawn flat, with a gradient, pixel noise or faint straight lines
  (seen styles), or a faint blotchy texture or faint curved strokes (held out for the shifted split);
- supersample: shapes are drawn at k times the size and box-filtered down; 1 gives aliased edges;
- outline: none, a dark grey outline, or one in a darker shade of the fill (one pixel wide, inside
  the edge; objects under OUTLINE_MIN_RADIUS pixels are drawn without);
- star_inner: a star's inner radius over its outer one;
- rgb: a shade inside the hue, saturation and value ranges of the object's colour name (HUES); the
  hue ranges of different names stay at least MIN_HUE_GAP degrees apart;
- aspect: width over height of the drawn shape, within [MIN_ASPECT, 1 / MIN_ASPECT]; the narrower
  axis is squeezed, so a shape never leaves its circumcircle;
- rotation: within +-MAX_ROTATION degrees (circles are not rotated);
- radius: circumradius as a fraction of the side, from separate small and large ranges (RADIUS).

The shifted split draws its canvases and backgrounds from SHIFTED_CANVASES and SHIFTED_BACKGROUNDS,
which the other splits never use; everything else is drawn from the same ranges in every split.
"""

from __future__ import annotations

import colorsys
import functools

import numpy as np
from PIL import Image, ImageDraw

# --- what the seen splits (train, val, test, compositional) and the shifted split draw from ---------------
SEEN_CANVASES = (48, 56, 64, 72, 80, 96)
SEEN_BACKGROUNDS = ("flat", "gradient", "noise", "lines")
SHIFTED_CANVASES = (112, 128, 144, 160)  # never in the seen splits
SHIFTED_BACKGROUNDS = ("texture", "strokes")  # never in the seen splits
BACKGROUNDS = SEEN_BACKGROUNDS + SHIFTED_BACKGROUNDS

# --- knobs shared by every split ---------------------------------------------------------------------------
SUPERSAMPLES = (1, 2, 4)  # 1: aliased edges; 2 and 4: anti-aliased
OUTLINES = {"none": 0.5, "dark": 0.25, "shade": 0.25}  # each kind with its probability
DARK_OUTLINE = (40, 40, 40)
SHADE = 0.6  # a "shade" outline is the fill times this
OUTLINE_MIN_RADIUS = 8.0  # pixels; a one-pixel outline would hide most of the colour of a smaller object
STAR_INNER = (0.38, 0.5)
# Circumradius as a fraction of the image side; the gap keeps "small" and "large" apart even after the
# aspect squeeze (0.10 < 0.14 * MIN_ASPECT).
RADIUS = {"small": (0.075, 0.10), "large": (0.14, 0.175)}
MIN_ASPECT = 0.9  # a square stays a square, a diamond (0.6 wide) stays taller than wide
MIN_CIRCLE_ASPECT = 0.95
MAX_ROTATION = 20.0  # degrees; small, so a square never turns into a diamond
# Hue (degrees; red wraps around 0), saturation and value ranges of each named colour.
HUES = {
    "red": ((-7.0, 5.0), (0.75, 0.95), (0.72, 0.92)),
    "orange": ((21.0, 31.0), (0.85, 1.0), (0.9, 1.0)),
    "yellow": ((45.0, 55.0), (0.85, 1.0), (0.85, 0.97)),
    "green": ((115.0, 145.0), (0.65, 0.9), (0.5, 0.72)),
    "blue": ((215.0, 235.0), (0.7, 0.9), (0.75, 0.92)),
    "purple": ((270.0, 290.0), (0.6, 0.8), (0.6, 0.8)),
}
MIN_HUE_GAP = 12.0  # degrees between the hue ranges of any two names (red/orange, orange/yellow: 16, 14)
# The centre of each range, for reference (manifest `color_rgb`).
COLOR_RGB = {
    name: tuple(round(255 * v) for v in colorsys.hsv_to_rgb((sum(h) / 2 % 360) / 360, sum(s) / 2, sum(v) / 2))
    for name, (h, s, v) in HUES.items()
}
BACKGROUND_LIGHT = (218, 248)  # the base grey level of a background; pale, so every colour stands out
BACKGROUND_TINT = 8  # each channel may differ from the grey level by this much


def sample_style(rng: np.random.Generator, held_out: bool, canvas: int | None = None) -> dict:
    """A scene's style; `held_out` draws canvas and background from the shifted split's sets.

    `canvas` fixes the side instead of drawing it (`vistune data synth --image-size`).
    """
    canvases = SHIFTED_CANVASES if held_out else SEEN_CANVASES
    backgrounds = SHIFTED_BACKGROUNDS if held_out else SEEN_BACKGROUNDS
    return {
        "canvas": int(canvas if canvas is not None else canvases[int(rng.integers(len(canvases)))]),
        "background": backgrounds[int(rng.integers(len(backgrounds)))],
        "supersample": SUPERSAMPLES[int(rng.integers(len(SUPERSAMPLES)))],
        "outline": list(OUTLINES)[int(rng.choice(len(OUTLINES), p=list(OUTLINES.values())))],
        "star_inner": round(float(rng.uniform(*STAR_INNER)), 2),
    }


def background_color(rng: np.random.Generator) -> list[int]:
    """A pale base colour: a light grey level with a faint tint per channel."""
    light = rng.uniform(*BACKGROUND_LIGHT)
    return [
        int(v) for v in np.clip(np.round(light + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, 3)), 0, 255)
    ]


def shade(rng: np.random.Generator, color: str) -> list[int]:
    """An RGB shade of a named colour, inside its HUES ranges."""
    (h0, h1), (s0, s1), (v0, v1) = HUES[color]
    hue = rng.uniform(h0, h1) % 360
    return [round(255 * c) for c in colorsys.hsv_to_rgb(hue / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))]


def radius(rng: np.random.Generator, size: str, side: int) -> float:
    """A circumradius in pixels (2 decimals) for a size name on a canvas of `side` pixels."""
    return round(float(rng.uniform(*RADIUS[size])) * side, 2)


def aspect(rng: np.random.Generator, shape: str) -> float:
    """Width over height of a drawn shape (2 decimals); circles are squeezed less."""
    least = MIN_CIRCLE_ASPECT if shape == "circle" else MIN_ASPECT
    squeeze = rng.uniform(least, 1.0)
    return round(float(squeeze if rng.random() < 0.5 else 1 / squeeze), 2)


def rotation(rng: np.random.Generator, shape: str) -> float:
    """Degrees (2 decimals); circles are not rotated."""
    return 0.0 if shape == "circle" else round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2)


def outline_color(style: dict, fill: tuple[int, ...]) -> tuple[int, ...] | None:
    """The outline colour of an object with this fill, or None."""
    if style["outline"] == "dark":
        return DARK_OUTLINE
    if style["outline"] == "shade":
        return tuple(round(c * SHADE) for c in fill)
    return None


@functools.cache
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:side, 0:side] / side
    return yy, xx


def draw_background(side: int, base: list[int], kind: str, rng: np.random.Generator) -> Image.Image:
    """The background of a scene (RGB, side x side): `base` drawn as `kind` says, faintly."""
    pixels = np.empty((side, side, 3))
    pixels[:] = base
    if kind == "gradient":  # a linear ramp of up to 18 levels across the image
        angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(6, 18)
        yy, xx = _grid(side)
        pixels += (amplitude * (xx * np.cos(angle) + yy * np.sin(angle) - 0.5))[..., None]
    elif kind == "noise":
        pixels += rng.normal(0, rng.uniform(2, 5), size=(side, side, 3))
    elif kind == "texture":  # low-frequency blotches (bilinear value noise) and a little grain
        cells = int(rng.integers(4, 9))
        coarse = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype(np.float32), "F")
        blotches = np.asarray(coarse.resize((side, side), Image.Resampling.BILINEAR))
        pixels += rng.uniform(5, 10) * blotches[..., None] + rng.normal(0, 1.5, (side, side, 3))
    elif kind not in ("flat", "lines", "strokes"):
        raise ValueError(f"unknown background {kind!r}; valid backgrounds are {BACKGROUNDS}")
    image = Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")
    if kind in ("lines", "strokes"):
        _faint_marks(ImageDraw.Draw(image), side, base, kind, rng)
    return image


def _faint_marks(draw: ImageDraw.ImageDraw, side: int, base: list[int], kind: str, rng) -> None:
    """Straight lines across the image ("lines") or curved strokes ("strokes"), a little darker than base."""
    for _ in range(int(rng.integers(2, 7))):
        color = tuple(round(c * (1 - rng.uniform(0.08, 0.16))) for c in base)
        if kind == "lines":
            points = [tuple(p) for p in rng.uniform(-0.2, 1.2, (2, 2)) * side]
            draw.line(points, fill=color, width=1)
            continue
        # A quadratic Bezier curve through three random points, 16 segments, 1 or 2 px wide.
        p0, p1, p2 = rng.uniform(-0.1, 1.1, (3, 2)) * side
        t = np.linspace(0, 1, 17)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        draw.line([tuple(p) for p in curve], fill=color, width=int(rng.integers(1, 3)), joint="curve")
