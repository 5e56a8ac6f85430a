"""What an object_words model reads from shapes-world images, against their scene graphs.

    python benchmarks/read_accuracy.py MODEL_DIR DATA_DIR [--split test] [--images 500]

Runs the tower and `projector.read()` (the text the LLM is shown, "small red star 3 7, ...") on the
first N images of a split and compares it with the scene graphs written beside them: the share of
images read exactly, with the right number of objects, and, where the count is right, the accuracy of
each word (size, colour, shape, x digit, y digit) object by object, both lists ordered left to right.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from vistune.data.images import load_image
from vistune.model.vlm import load_vlm
from vistune.shapes.scenes import load_scenes


def truth(scene: dict, bins: int) -> list[str]:
    """The scene graph in the projector's words: objects left to right (then top to bottom)."""
    objects = sorted(scene["objects"], key=lambda o: (o["x"], o["y"]))

    def words(o: dict) -> list[str]:
        x, y = (
            min(int(o[k] / scene[side] * bins), bins - 1) for k, side in (("x", "width"), ("y", "height"))
        )
        return [o["size"], o["color"], o["shape"], str(x), str(y)]

    return [" ".join(words(o)) for o in objects]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model_dir")
    parser.add_argument("data_dir", help="a `vistune data synth` directory")
    parser.add_argument("--split", default="test")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    args = parser.parse_args()
    model = load_vlm(args.model_dir).eval()
    if not hasattr(model.projector, "read"):
        raise SystemExit(
            f"{args.model_dir}: projector {model.cfg.projector.name!r} has no read(); use object_words"
        )
    data = Path(args.data_dir)
    scenes = load_scenes(data / "scenes" / f"{args.split}.jsonl")[: args.images]
    exact = counted = aligned = 0
    right = [0] * 5
    with torch.no_grad():
        for i in range(0, len(scenes), args.batch_size):
            chunk = scenes[i : i + args.batch_size]
            pixels = model.vision.preprocess([load_image(data / "images" / s["image"]) for s in chunk])
            for scene, text in zip(chunk, model.projector.read(model.vision(pixels)), strict=True):
                text = text.split(": ", 1)[-1]  # a projector with `count` says the number first
                read, want = (text.split(", ") if text else []), truth(scene, model.projector.bins)
                if getattr(model.projector, "position_first", False):  # "3 7 small red star"
                    read = [" ".join(o.split()[2:] + o.split()[:2]) for o in read]
                exact += read == want
                if len(read) == len(want):
                    counted += 1
                    for a, b in zip(read, want, strict=True):
                        aligned += 1
                        right = [r + (x == y) for r, x, y in zip(right, a.split(), b.split(), strict=True)]
    n = len(scenes)
    print(f"{args.split}: {n} images; read exactly {exact / n:.3f}; object count right {counted / n:.3f}")
    words = ("size", "colour", "shape", "x digit", "y digit")
    print(
        "per-object word accuracy: "
        + ", ".join(f"{w} {r / max(aligned, 1):.4f}" for w, r in zip(words, right, strict=True))
    )


if __name__ == "__main__":
    main()
