"""Draw a shapes-world scene graph: flat shapes on a pale background, as the scene's `style` says."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from vistune.shapes import questions as Q
from vistune.shapes.style import OUTLINE_MIN_RADIUS, draw_background, outline_color


def _unit_points(shape: str, star_inner: float) -> list[tuple[float, float]]:
    """A shape's outline on its unit circumcircle, before squeeze and rotation (y grows downward)."""
    if shape == "square":
        return [(np.cos(a), np.sin(a)) for a in np.radians([45, 135, 225, 315])]
    if shape == "triangle":
        return [(np.cos(a), np.sin(a)) for a in np.radians([-90, 30, 150])]
    if shape == "diamond":
        return [(0, -1), (0.6, 0), (0, 1), (-0.6, 0)]  # taller than wide, unlike a rotated square
    if shape == "star":
        angles = np.radians(-90 + 36 * np.arange(10))
        return [
            (np.cos(a) * (1 if i % 2 == 0 else star_inner), np.sin(a) * (1 if i % 2 == 0 else star_inner))
            for i, a in enumerate(angles)
        ]
    raise ValueError(f"unknown shape {shape!r}; valid shapes are {Q.SHAPES}")


def _squeeze(obj: dict) -> tuple[float, float]:
    """x and y scale of the drawn shape: the narrower axis is squeezed, so it stays in its circumcircle."""
    a = obj["aspect"]
    return (a, 1.0) if a <= 1 else (1.0, 1 / a)


def _vertices(obj: dict, scale: int, star_inner: float) -> list[tuple[float, float]]:
    """Polygon of a non-circle object at `scale`, squeezed, then rotated about its centre."""
    r, (sx, sy) = obj["radius"] * scale, _squeeze(obj)
    c, s = np.cos(np.radians(obj["rotation"])), np.sin(np.radians(obj["rotation"]))
    cx, cy = obj["x"] * scale, obj["y"] * scale
    points = [(px * sx, py * sy) for px, py in _unit_points(obj["shape"], star_inner)]
    return [(cx + r * (px * c - py * s), cy + r * (px * s + py * c)) for px, py in points]


def draw_scene(scene: dict, rng: np.random.Generator) -> Image.Image:
    """Draw a scene graph (RGB, width x height); `rng` only draws the background's own randomness."""
    style, k = scene["style"], scene["style"]["supersample"]
    background = draw_background(scene["width"], scene["background"], style["background"], rng)
    big = (
        background.resize((scene["width"] * k, scene["height"] * k), Image.Resampling.NEAREST)
        if k > 1
        else background
    )
    draw = ImageDraw.Draw(big)  # an outline is k pixels here, one in the image, inside the shape's edge
    for obj in scene["objects"]:
        fill = tuple(obj["rgb"])
        outline = outline_color(style, fill) if obj["radius"] >= OUTLINE_MIN_RADIUS else None
        if obj["shape"] == "circle":
            (sx, sy), r = _squeeze(obj), obj["radius"] * k
            x, y = obj["x"] * k, obj["y"] * k
            draw.ellipse(
                (x - r * sx, y - r * sy, x + r * sx, y + r * sy), fill=fill, outline=outline, width=k
            )
        else:
            draw.polygon(_vertices(obj, k, style["star_inner"]), fill=fill, outline=outline, width=k)
    # Averaging each k x k block (box filter) is supersampling anti-aliasing; ~20x cheaper than LANCZOS.
    return big.reduce(k) if k > 1 else big
