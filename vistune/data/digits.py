"""`vistune data digits`: real handwriting that ships with scikit-learn, as an image-conversation dataset.

`sklearn.datasets.load_digits` holds 1,797 8x8 digits written by 43 people. The first half trains and the
second half tests, as scikit-learn's own example splits them, so no writer's digit is in both. Each
digit is drawn dark on white at 64x64; a *pair* image (128x64) holds two digits of the same split side
by side. Questions about singles: which digit, even or odd; about pairs: the left digit, the right one,
which side holds the larger (never asked of equal digits), and their sum. Every question has several
wordings; answers are one word or number.

Layout written by `write_digits(out, ...)`:
    imagefolder/<split>/<digit>/<id>.png   single digits (train, test): a tower's `classify` stage data
    images/<split>/<id>.png                single digits (64x64) and pairs (128x64)
    train/conversations.json               LLaVA records: 2-4 questions about one image
    <split>/vqa.json                       one question per record, `question_type` and `answer` fields
    manifest.json                          seed, sizes, question kinds, counts

Written beside `out` and renamed into place when complete (`vistune.data.outdir`).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from vistune.data.outdir import OutputKind, check_out, move_into_place, staging_dir
from vistune.data.records import IMAGE_PLACEHOLDER

SIDE = 64  # pixels per digit cell
SPLITS = ("train", "test")
KINDS = ("digit", "parity", "left", "right", "larger", "sum")
SINGLE_KINDS, PAIR_KINDS = KINDS[:2], KINDS[2:]
TEMPLATES: dict[str, tuple[str, ...]] = {
    "digit": (
        "Which digit is this?",
        "What digit is written here?",
        "What number is shown in the image?",
        "Read the handwritten digit.",
        "Which number did the person write?",
    ),
    "parity": (
        "Is the digit even or odd?",
        "Is this number odd or even?",
        "Even or odd?",
        "Is the handwritten number even or odd?",
    ),
    "left": (
        "What is the left digit?",
        "Which digit is on the left?",
        "Read the digit on the left side.",
        "What number is written on the left?",
    ),
    "right": (
        "What is the right digit?",
        "Which digit is on the right?",
        "Read the digit on the right side.",
        "What number is written on the right?",
    ),
    "larger": (
        "Which digit is larger, the left or the right one?",
        "Is the left or the right number bigger?",
        "Which side holds the larger digit, left or right?",
        "Which of the two numbers is greater: left or right?",
    ),
    "sum": (
        "What is the sum of the two digits?",
        "What do the two numbers add up to?",
        "Add the two digits. What do you get?",
        "What is the left digit plus the right digit?",
    ),
}
# How often each kind is asked of a test image: every kind about as often as the others.
DEFAULT_SIZES = {"train_pairs": 5000, "test_pairs": 800}
OUTPUT = OutputKind(
    "digits dataset",
    "vistune data digits",
    frozenset({"manifest.json", "images", "imagefolder", *SPLITS}),
    lambda manifest: manifest.get("dataset") == "sklearn-digits",
)


def load_split_digits() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """scikit-learn's digits as {split: ((N, 8, 8) ink 0..16, (N,) labels)}; first half train."""
    from sklearn.datasets import load_digits

    data = load_digits()
    half = len(data.images) // 2
    return {
        "train": (data.images[:half], data.target[:half]),
        "test": (data.images[half:], data.target[half:]),
    }


def draw(ink: np.ndarray) -> Image.Image:
    """One 8x8 digit (ink 0..16) as a SIDE x SIDE RGB image, dark ink on white, smoothly upscaled."""
    grey = Image.fromarray((255 - ink * (255 / 16)).clip(0, 255).astype(np.uint8), "L")
    return grey.resize((SIDE, SIDE), Image.Resampling.BICUBIC).convert("RGB")


def draw_pair(left: np.ndarray, right: np.ndarray) -> Image.Image:
    """Two digits side by side: a (2 * SIDE) x SIDE image."""
    image = Image.new("RGB", (2 * SIDE, SIDE), "white")
    image.paste(draw(left), (0, 0))
    image.paste(draw(right), (SIDE, 0))
    return image


def answer(kind: str, digits: tuple[int, ...]) -> str:
    """The answer to a question of `kind` about an image showing `digits` (left to right)."""
    if kind == "digit":
        return str(digits[0])
    if kind == "parity":
        return "even" if digits[0] % 2 == 0 else "odd"
    left, right = digits
    if kind == "larger":
        if left == right:
            raise ValueError("larger is not asked of two equal digits")
        return "left" if left > right else "right"
    return str({"left": left, "right": right, "sum": left + right}[kind])


def kinds_for(digits: tuple[int, ...]) -> tuple[str, ...]:
    """The question kinds that can be asked about an image showing `digits`."""
    if len(digits) == 1:
        return SINGLE_KINDS
    return tuple(k for k in PAIR_KINDS if k != "larger" or digits[0] != digits[1])


def _llava(rid: str, image: str, pairs: list[tuple[str, str]], **extra: object) -> dict:
    """A LLaVA record whose first human turn opens with the image placeholder."""
    turns = []
    for i, (question, reply) in enumerate(pairs):
        turns.append({"from": "human", "value": f"{IMAGE_PLACEHOLDER}\n{question}" if i == 0 else question})
        turns.append({"from": "gpt", "value": reply})
    return {"id": rid, "image": image, "conversations": turns, **extra}


def _images(
    split: str, inks: np.ndarray, labels: np.ndarray, pairs: int, rng: random.Random, tmp: Path
) -> list[tuple[str, tuple[int, ...]]]:
    """Write a split's singles (and its ImageFolder view) and `pairs` pair images; (image, digits) each."""
    made = []
    for i, (ink, label) in enumerate(zip(inks, labels, strict=True)):
        name = f"{split}-single-{i:04d}.png"
        image = draw(ink)
        image.save(tmp / "images" / split / name)
        folder = tmp / "imagefolder" / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / name)
        made.append((f"{split}/{name}", (int(label),)))
    for i in range(pairs):
        a, b = rng.randrange(len(inks)), rng.randrange(len(inks))
        name = f"{split}-pair-{i:05d}.png"
        draw_pair(inks[a], inks[b]).save(tmp / "images" / split / name)
        made.append((f"{split}/{name}", (int(labels[a]), int(labels[b]))))
    return made


def _conversations(images: list[tuple[str, tuple[int, ...]]], rng: random.Random) -> list[dict]:
    """Training records: every kind that can be asked of an image, in a random order, several wordings."""
    records = []
    for image, digits in images:
        kinds = list(kinds_for(digits))
        rng.shuffle(kinds)
        turns = [(rng.choice(TEMPLATES[k]), answer(k, digits)) for k in kinds]
        rid = Path(image).stem
        records.append(_llava(rid, image, turns, digits=list(digits)))
    return records


def _vqa(images: list[tuple[str, tuple[int, ...]]], rng: random.Random) -> list[dict]:
    """One question per image, the kinds taken in turn among those the image allows."""
    records = []
    for n, (image, digits) in enumerate(images):
        kinds = kinds_for(digits)
        kind = kinds[n % len(kinds)]
        reply = answer(kind, digits)
        rid = f"{Path(image).stem}-{kind}"
        records.append(
            _llava(rid, image, [(rng.choice(TEMPLATES[kind]), reply)], question_type=kind, answer=reply,
                   digits=list(digits))
        )  # fmt: skip
    return records


def _write_split(
    tmp: Path, split: str, inks: np.ndarray, labels: np.ndarray, pairs: int, seed: int
) -> dict[str, int]:
    """Images and texts of one split; counts of what was written."""
    rng = random.Random(f"{seed}-{split}")
    (tmp / "images" / split).mkdir(parents=True)
    (tmp / split).mkdir()
    images = _images(split, inks, labels, pairs, rng, tmp)
    vqa = _vqa(images, rng)
    files = {"vqa": vqa}
    if split == "train":
        files["conversations"] = _conversations(images, rng)
    for name, records in files.items():
        (tmp / split / f"{name}.json").write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    kinds = Counter(r["question_type"] for r in vqa)
    return {"singles": len(inks), "pairs": pairs, **{f"vqa_{k}": kinds[k] for k in KINDS}}


def write_digits(out: str | Path, train_pairs: int = 5000, test_pairs: int = 800, seed: int = 0) -> dict:
    """Write the digits dataset to `out` (missing, empty, or a previous output); return its manifest."""
    if train_pairs < 0 or test_pairs < 0:
        raise ValueError(f"pair counts must be at least 0, got {train_pairs} and {test_pairs}")
    out = Path(out).resolve()
    replace = check_out(out, OUTPUT)
    tmp = staging_dir(out)
    try:
        split_digits = load_split_digits()
        counts = {
            split: _write_split(tmp, split, *split_digits[split], pairs, seed)
            for split, pairs in (("train", train_pairs), ("test", test_pairs))
        }
        manifest = {"dataset": "sklearn-digits", "seed": seed, "side": SIDE, "kinds": list(KINDS),
                    "templates": TEMPLATES, "counts": counts}  # fmt: skip
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        move_into_place(tmp, out, replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
    return manifest


def main_digits(argv: list[str] | None = None) -> int:
    """`vistune data digits --out DIR`: write scikit-learn's digits as images, conversations and VQA."""
    p = argparse.ArgumentParser(prog="vistune data digits", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (new, empty, or a previous digits dataset)")
    p.add_argument("--train-pairs", type=int, default=DEFAULT_SIZES["train_pairs"],
                   help="pair images made from training digits")  # fmt: skip
    p.add_argument("--test-pairs", type=int, default=DEFAULT_SIZES["test_pairs"],
                   help="pair images made from test digits")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    manifest = write_digits(args.out, args.train_pairs, args.test_pairs, args.seed)
    counts = manifest["counts"]
    print(
        f"wrote {args.out}: train {counts['train']['singles']} digits + {counts['train']['pairs']} pairs, "
        f"test {counts['test']['singles']} digits + {counts['test']['pairs']} pairs"
    )
    return 0
