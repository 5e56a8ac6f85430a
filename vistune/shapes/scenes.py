"""The shapes world's scene graphs: what each image holds, sampled deterministically, and read back.

Each image holds 1..6 flat, non-overlapping objects (6 colours x 5 shapes x 2 sizes, continuous positions,
small rotations) on a light background. Image `i` of a split uses its own numpy Generator seeded from
(seed, split, i), so the work splits across processes and the output is byte-identical for the same seed
and sizes, whatever the worker count. The compositional split holds colour+shape pairs (HELD_OUT) that
no other split has.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vistune.shapes import questions as Q
from vistune.shapes.render import draw_scene

SPLITS = ("train", "val", "test", "compositional")
RADIUS = {"small": 0.09, "large": 0.16}  # circumradius as a fraction of the image side
# Never in train/val/test; every compositional image has at least one. One per shape, distinct colours.
HELD_OUT = (
    ("blue", "circle"),
    ("yellow", "square"),
    ("red", "triangle"),
    ("green", "star"),
    ("purple", "diamond"),
)
SEEN = tuple(c for c in Q.COMBOS if c not in HELD_OUT)
MAX_OBJECTS = 6
MARGIN_PX = 2.0  # minimum gap between two objects' circumcircles, in pixels
MAX_ROTATION = 20.0  # degrees; small, so a square never turns into a diamond
MIN_IMAGE_SIZE = 16  # six objects no longer fit reliably below this side (pixels)
# What a previous output holds at its top level; `synthesize` replaces a dir holding nothing else.


def rng_for(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The Generator of one image; `stream` separates scene (0), texts (1), pixel noise (2), POPE (3)."""
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


def _place(rng: np.random.Generator, kinds: list[tuple], size_px: int) -> list[dict] | None:
    """Place objects (largest first) by rejection sampling; None when one does not fit."""
    objects: list[dict] = []
    for color, shape, size in sorted(kinds, key=lambda k: k[2] != "large"):
        r = round(RADIUS[size] * size_px, 2)
        for _ in range(60):
            x, y = (round(float(v), 2) for v in rng.uniform(r + 1, size_px - r - 1, size=2))
            if all(np.hypot(x - o["x"], y - o["y"]) >= r + o["radius"] + MARGIN_PX for o in objects):
                break
        else:
            return None
        rotation = 0.0 if shape == "circle" else round(float(rng.uniform(-MAX_ROTATION, MAX_ROTATION)), 2)
        objects.append(
            {"color": color, "shape": shape, "size": size, "x": x, "y": y, "radius": r, "rotation": rotation}
        )
    return sorted(objects, key=lambda o: (o["x"], o["y"]))


def sample_scene(seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """The scene graph of image `index` of `split` (a pure function of its arguments)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {SPLITS}")
    rng = rng_for(seed, split, index, 0)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(1000):
        kinds = [
            (*Q.pick(rng, SEEN if split != "compositional" else Q.COMBOS), Q.pick(rng, Q.SIZES))
            for _ in range(n)
        ]
        if split == "compositional":
            kinds[0] = (*Q.pick(rng, HELD_OUT), kinds[0][2])
        objects = _place(rng, kinds, image_size)
        if objects is not None:
            break
    else:
        raise RuntimeError(f"could not place {n} objects in a {image_size}px image; use a larger image")
    sid = f"{split}-{index:06d}"
    background = [int(v) for v in rng.integers(200, 250, size=3)]
    return {
        "id": sid,
        "image": f"{split}/{sid}.png",
        "split": split,
        "width": image_size,
        "height": image_size,
        "background": background,
        "objects": objects,
    }


def render(scene: dict, seed: int = 0) -> Image.Image:
    """Draw a scene graph (RGB, width x height). The seed only varies the background noise."""
    return draw_scene(scene, rng_for(seed, scene["split"], int(scene["id"].rsplit("-", 1)[1]), 2))


def load_scenes(path: str | Path) -> list[dict]:
    """Read a scenes/<split>.jsonl file; a malformed line is an error naming the file and line."""
    scenes = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            try:
                scene = json.loads(line) if line.strip() else None
                if scene is not None and not all(k in scene for k in ("objects", "image", "width", "height")):
                    raise KeyError("objects, image, width and height are required")
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path} line {number}: not a scene graph ({err})") from err
            if scene is not None:
                scenes.append(scene)
    return scenes
