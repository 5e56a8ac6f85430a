"""Draw a shapes-world scene graph: flat anti-aliased shapes on a light, slightly noisy background."""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image, ImageDraw

from vistune.shapes import questions as Q

COLOR_RGB = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (230, 190, 0),
    "purple": (140, 50, 190),
    "orange": (245, 120, 10),
}
SUPERSAMPLE = 4  # draw at 4x and average 4x4 blocks down: anti-aliased edges


def _vertices(obj: dict, scale: int) -> list[tuple[float, float]]:
    """Polygon of a non-circle object at `scale`, rotated about its centre."""
    r = obj["radius"] * scale
    if obj["shape"] == "square":
        pts = [(np.cos(a), np.sin(a)) for a in np.radians([45, 135, 225, 315])]
    elif obj["shape"] == "triangle":
        pts = [(np.cos(a), np.sin(a)) for a in np.radians([-90, 30, 150])]
    elif obj["shape"] == "diamond":
        pts = [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]  # taller than wide, unlike a rotated square
    elif obj["shape"] == "star":
        angles = np.radians(-90 + 36 * np.arange(10))
        pts = [
            (np.cos(a) * (1 if i % 2 == 0 else 0.45), np.sin(a) * (1 if i % 2 == 0 else 0.45))
            for i, a in enumerate(angles)
        ]
    else:
        raise ValueError(f"unknown shape {obj['shape']!r}; valid shapes are {Q.SHAPES}")
    c, s = np.cos(np.radians(obj["rotation"])), np.sin(np.radians(obj["rotation"]))
    cx, cy = obj["x"] * scale, obj["y"] * scale
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in pts]


@functools.cache
def _grid(h: int, w: int) -> np.ndarray:
    return np.mgrid[0:h, 0:w] / max(h, w)


def _background(scene: dict, rng: np.random.Generator) -> Image.Image:
    """The light background colour with a faint linear gradient and pixel noise."""
    h, w = scene["height"], scene["width"]
    angle, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(0, 16)
    yy, xx = _grid(h, w)
    ramp = amplitude * ((xx * np.cos(angle) + yy * np.sin(angle)) - 0.5)
    noise = rng.normal(0, 2.0, size=(h, w, 3))
    pixels = np.asarray(scene["background"], dtype=np.float64) + ramp[..., None] + noise
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


def draw_scene(scene: dict, rng: np.random.Generator) -> Image.Image:
    """Draw a scene graph (RGB, width x height); `rng` only draws the background gradient and noise."""
    k = SUPERSAMPLE
    big = _background(scene, rng).resize((scene["width"] * k, scene["height"] * k), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    for obj in scene["objects"]:
        fill = COLOR_RGB[obj["color"]]
        if obj["shape"] == "circle":
            x, y, r = obj["x"] * k, obj["y"] * k, obj["radius"] * k
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            draw.polygon(_vertices(obj, k), fill=fill)
    # Averaging each k x k block (box filter) is supersampling anti-aliasing; ~20x cheaper than LANCZOS.
    return big.reduce(k)
