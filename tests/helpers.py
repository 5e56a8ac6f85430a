"""Helpers shared by several test files: a tiny BERT text tower with a hand-written WordPiece vocab,
a tiny CLIP image-text model, coloured-shape images, image-caption pair files, and a fake predictor for
the evaluation runner."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vistune.config import VisionConfig
from vistune.data.readers import load_records
from vistune.model.contrastive import ContrastiveModel
from vistune.model.text_tower import build_text_tower
from vistune.model.vision import build_vision_tower
from vistune.train.contrastive import pair_of

COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 190, 0)}
SHAPES = ("circle", "square")
WORDS = "a an the of photo picture and small large ##s".split() + list(COLORS) + list(SHAPES)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


def tiny_text_dir(root) -> str:
    """Save a tiny random BertModel and its WordPiece tokenizer (hand-written vocab) under root."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = root / "tiny-bert"
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return str(path)


def tiny_model(
    root, loss: str = "clip", embed_dim: int = 16, text_dir: str | None = None
) -> ContrastiveModel:
    """Tiny CLIP vision tower (32 px, 4x4 patches) + tiny BERT (saved under root unless text_dir), seed 0."""
    text_dir = text_dir or tiny_text_dir(root)
    torch.manual_seed(0)
    vision = build_vision_tower(
        VisionConfig(
            kind="clip",
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    return ContrastiveModel(vision, build_text_tower(text_dir), embed_dim, loss)


def shape_image(color: str, shape: str, size: int = 32) -> Image.Image:
    """One coloured shape on white."""
    im = Image.new("RGB", (size, size), "white")
    draw, box = ImageDraw.Draw(im), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return im


def write_pairs(root, n_per_combo: int = 2) -> tuple[str, str]:
    """Write images and a pairs.jsonl of 'a {color} {shape}' captions; return (pairs path, image root)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for color in COLORS:
        for shape in SHAPES:
            for k in range(n_per_combo):
                name = f"{color}-{shape}-{k}.png"
                shape_image(color, shape, 32 + 8 * k).save(images / name)
                lines.append(json.dumps({"image": name, "caption": f"a {color} {shape}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "pairs.jsonl"), str(images)


def read_pairs(pairs: str, image_root: str) -> list[tuple[Path, str]]:
    """(image path, caption) of each line of a pairs file written by write_pairs."""
    return [pair_of(r, Path(image_root)) for r in load_records(pairs, image_root)]


class FakePredictor:
    """Answers from a question -> answer table; checks what the runner hands it."""

    def __init__(self, table: dict[str, str] | None = None, default: str = "no idea"):
        self.table, self.default, self.batches = table or {}, default, []

    def answer(self, conversations, images, max_new_tokens=32):
        assert len(conversations) == len(images)
        self.batches.append(len(conversations))
        out = []
        for conv, imgs in zip(conversations, images, strict=True):
            assert conv[-1].role == "user"
            assert sum(t.content.count("<image>") for t in conv) == len(imgs)
            assert all(isinstance(im, Image.Image) and im.mode == "RGB" for im in imgs)
            question = conv[-1].content.replace("<image>", "").strip()
            out.append(next((a for q, a in self.table.items() if q in question), self.default))
        return out
