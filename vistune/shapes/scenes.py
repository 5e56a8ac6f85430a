"""The shapes world's scene graphs: what each image holds, sampled deterministically, and read back.

Each image holds 1..6 flat, non-overlapping objects (6 colours x 5 shapes x 2 sizes, continuous positions,
small rotations, shades and squeezes) on a pale background, drawn in a sampled `style` (`style.py`).
Image `i` of a split uses its own numpy Generators seeded from (seed, split, i, stream), so the work
splits across processes and the output is byte-identical for the same seed and sizes, whatever the
worker count. The compositional split holds colour+shape pairs (HELD_OUT) that no other split has; the
shifted split holds canvases and backgrounds (style.SHIFTED_*) that no other split has.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from vistune.shapes import questions as Q
from vistune.shapes import style as St
from vistune.shapes.render import draw_scene

SPLITS = ("train", "val", "test", "compositional", "shifted")
SHIFTED = "shifted"  # the split drawn in held-out styles and asked with held-out templates
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
MIN_IMAGE_SIZE = 24  # six objects no longer fit reliably below this side (16 px: up to ~500 tries)
STREAMS = {"scene": 0, "texts": 1, "pixels": 2, "pope": 3, "style": 4, "relations": 5, "multiturn": 6}


def rng_for(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The Generator of one image; `stream` separates its uses (STREAMS: scene, texts, pixels, ...)."""
    return np.random.default_rng([seed, SPLITS.index(split), index, stream])


def _place(rng: np.random.Generator, kinds: list[tuple], size_px: int) -> list[dict] | None:
    """Place objects (largest first) by rejection sampling; None when one does not fit.

    Each object is drawn inside its circumcircle (radius), so circles that keep MARGIN_PX apart and
    stay inside the canvas keep the shapes apart and inside too.
    """
    objects: list[dict] = []
    for color, shape, size in sorted(kinds, key=lambda k: k[2] != "large"):
        r = St.radius(rng, size, size_px)
        for _ in range(60):
            x, y = (round(float(v), 2) for v in rng.uniform(r + 1, size_px - r - 1, size=2))
            if all(np.hypot(x - o["x"], y - o["y"]) >= r + o["radius"] + MARGIN_PX for o in objects):
                break
        else:
            return None
        look = {
            "rotation": St.rotation(rng, shape),
            "aspect": St.aspect(rng, shape),
            "rgb": St.shade(rng, color),
        }
        objects.append({"color": color, "shape": shape, "size": size, "x": x, "y": y, "radius": r, **look})
    return sorted(objects, key=lambda o: (o["x"], o["y"]))


def sample_scene(seed: int, split: str, index: int, image_size: int | None = None) -> dict:
    """The scene graph of image `index` of `split` (a pure function of its arguments).

    `image_size` fixes every canvas's side; None draws it from the split's canvases (style.py).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {SPLITS}")
    style_rng = rng_for(seed, split, index, STREAMS["style"])
    style = St.sample_style(style_rng, held_out=split == SHIFTED, canvas=image_size)
    background = St.background_color(style_rng)
    image_size = style["canvas"]
    rng = rng_for(seed, split, index, STREAMS["scene"])
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
    return {
        "id": sid,
        "image": f"{split}/{sid}.png",
        "split": split,
        "width": image_size,
        "height": image_size,
        "background": background,
        "style": style,
        "objects": objects,
    }


def render(scene: dict, seed: int = 0) -> Image.Image:
    """Draw a scene graph (RGB, width x height). The seed only varies the background's own randomness."""
    index = int(scene["id"].rsplit("-", 1)[1])
    return draw_scene(scene, rng_for(seed, scene["split"], index, STREAMS["pixels"]))


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
