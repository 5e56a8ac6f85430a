"""Evaluation throughput: records/s of the eval runner for batch sizes 1, 8 and 32.

    python benchmarks/eval_throughput.py MODEL_DIR [--records 64] [--task vqa]
    python benchmarks/eval_throughput.py --fake            # a trivial predictor: the runner's own cost

Builds synthetic shapes-like VQA records (64x64 PNGs in a temporary folder), loads the model once with
`vistune.infer.generate.load_generator` and times `vistune.eval.run.evaluate` (image loading, batched
`predictor.answer`, scoring) at each batch size. Prints one line per batch size and the speed-up over
batch size 1.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

from vistune.data.records import Record, Turn
from vistune.eval.run import evaluate
from vistune.infer.generate import load_generator

COLORS = ("red", "green", "blue", "yellow")


class TrivialPredictor:
    """Answers 'red' at once: measures everything but the model."""

    def answer(self, conversations, images, max_new_tokens=32):
        return ["red"] * len(conversations)


def make_records(folder: Path, n: int, seed: int = 0) -> list[Record]:
    """n one-image colour questions with their images written into folder."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        color = rng.choice(COLORS)
        im = Image.new("RGB", (64, 64), "white")
        x, y = rng.randint(0, 32), rng.randint(0, 32)
        ImageDraw.Draw(im).ellipse((x, y, x + 28, y + 28), fill=color)
        im.save(folder / f"{i}.png")
        turns = [Turn("user", "<image>\nWhat color is the circle? Answer with one word.")]
        records.append(Record(f"r{i}", [f"{i}.png"], turns, {"answer": color, "question_type": "color"}))
    return records


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", nargs="?", help="trained model directory (loaded by load_generator)")
    p.add_argument("--fake", action="store_true", help="use a trivial predictor (no model)")
    p.add_argument("--records", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=8)
    a = p.parse_args()
    if not a.fake and not a.model_dir:
        p.error("give MODEL_DIR or --fake")
    sizes = [int(s) for s in a.batch_sizes.split(",")]
    if a.fake:
        predictor, name = TrivialPredictor(), "trivial predictor"
    else:
        predictor, name = load_generator(a.model_dir, batch_size=max(sizes)), a.model_dir
    with tempfile.TemporaryDirectory() as tmp:
        records = make_records(Path(tmp), a.records)
        evaluate(predictor, records[: max(sizes)], "vqa", image_root=tmp, batch_size=max(sizes))  # warm-up
        print(f"eval throughput: {name}, {a.records} VQA records, max_new_tokens={a.max_new_tokens}")
        base = None
        for bs in sizes:
            start = time.perf_counter()
            _, m = evaluate(
                predictor, records, "vqa", image_root=tmp, batch_size=bs, max_new_tokens=a.max_new_tokens
            )
            rate = a.records / (time.perf_counter() - start)
            base = base or rate
            print(
                f"batch {bs:3d}: {rate:9.1f} records/s  (x{rate / base:.2f} vs batch {sizes[0]}), "
                f"accuracy {m['accuracy']:.3f}"
            )


if __name__ == "__main__":
    main()
