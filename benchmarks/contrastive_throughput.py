"""Contrastive training and embedding throughput: samples/s per step variant, images/s and texts/s.

Compares, on one model and one batch, the plain full-batch step, the chunked step (batch/4 at a time,
activations recomputed in the backward pass: gradient caching) and the LiT step with memoised text
features, and reports ratios to the plain step (absolute times drift on shared machines). Synthetic
64 px images and shapes-world-like captions; no files read.

    python benchmarks/contrastive_throughput.py [--vision-kind clip|siglip|resnet] [--text minilm|DIR]
        [--batch-size 64] [--steps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vistune.config import VISION_KINDS, Stage, VisionConfig  # noqa: E402
from vistune.model.contrastive import ContrastiveModel  # noqa: E402
from vistune.model.text_tower import build_text_tower  # noqa: E402
from vistune.model.vision import build_vision_tower  # noqa: E402
from vistune.train.contrastive import ContrastiveObjective  # noqa: E402
from vistune.train.trainable import set_trainable  # noqa: E402

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "diamond")


def batch(n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """Random-noise images and random two-object captions."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    texts = [
        f"a small {rng.choice(COLORS)} {rng.choice(SHAPES)} and a large {rng.choice(COLORS)} "
        f"{rng.choice(SHAPES)}"
        for _ in range(n)
    ]
    return images, texts


def timed(fn, steps: int) -> float:
    """Median seconds of `steps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vision-kind", choices=VISION_KINDS, default="clip")
    p.add_argument("--text", default="minilm")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vision = build_vision_tower(VisionConfig(kind=args.vision_kind, image_size=args.image_size))
    model = ContrastiveModel(vision, build_text_tower(args.text), 128, "clip")
    images, texts = batch(args.batch_size, args.image_size)
    pixels = vision.preprocess(images)
    n = args.batch_size

    def step(train: list[str], chunk: int):
        options = {"chunk_size": chunk}
        stage = Stage(name="bench", kind="contrastive", train=train, batch_size=n, options=options)
        objective = ContrastiveObjective(model, [(None, t) for t in texts], stage, torch.device("cpu"))
        set_trainable(objective, objective.parts(), stage)
        batch = {"pixel_values": pixels, "texts": texts}
        return lambda: (objective(batch).backward(), model.zero_grad())

    full = ["vision", "projector", "llm"]
    rows = [
        ("train: plain step, both towers", timed(step(full, n), args.steps)),
        (f"train: chunks of {n // 4} (grad cache)", timed(step(full, n // 4), args.steps)),
        ("train: LiT (text locked, cached)", timed(step(["vision", "projector"], n), args.steps)),
    ]
    model.eval()
    model.text_cache = None
    embed_img = timed(lambda: model.embed_images(images), args.steps)
    embed_txt = timed(lambda: model.embed_texts(texts), args.steps)
    mparams = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("v", vision), ("t", model.text))}
    print(
        f"vision {args.vision_kind} {args.image_size}px ({mparams['v']:.1f}M), text {args.text} "
        f"({mparams['t']:.1f}M), batch {n}, {args.threads} threads"
    )
    base = rows[0][1]
    for name, sec in rows:
        print(f"{name:36s} {n / sec:8.1f} samples/s   x{base / sec:.2f} vs plain")
    print(f"{'embed images (incl. preprocess)':36s} {n / embed_img:8.1f} images/s")
    print(f"{'embed texts':36s} {n / embed_txt:8.1f} texts/s")


if __name__ == "__main__":
    main()
