"""Use a trained contrastive model: embed images or texts to .npy, and classify images zero-shot.

`vistune embed MODEL_DIR --images DIR | --texts FILE --out DIR` writes L2-normalised `embeddings.npy`
(float32, one row per item) and `index.json` (the image paths relative to DIR, or the texts, in row
order). `vistune classify MODEL_DIR --images DIR --labels "red circle,blue star"` scores each image
against every label phrased through prompt templates (embeddings averaged per label, as CLIP does).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vistune.data.images import load_image
from vistune.model.contrastive import ContrastiveModel, load_contrastive

TEMPLATES = ("a photo of a {}.", "a {}", "an image of a {}.", "a picture with a {}.")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_images(root: str | Path) -> list[str]:
    """Image files under root (recursive), as sorted paths relative to root."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a directory of images")
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def embed_image_files(
    model: ContrastiveModel, root: str | Path, names: Sequence[str], batch_size: int = 64
) -> np.ndarray:
    """(N, E) float32 unit embeddings of root/name for each name, in order."""
    rows = []
    for i in range(0, len(names), batch_size):
        images = [load_image(Path(root) / n) for n in names[i : i + batch_size]]
        rows.append(model.embed_images(images).float().cpu().numpy())
    return np.concatenate(rows).astype(np.float32)


def embed_text_list(model: ContrastiveModel, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """(N, E) float32 unit embeddings of the texts, in order."""
    rows = [
        model.embed_texts(list(texts[i : i + batch_size])).float().cpu().numpy()
        for i in range(0, len(texts), batch_size)
    ]
    return np.concatenate(rows).astype(np.float32)


def label_embeddings(
    model: ContrastiveModel, labels: Sequence[str], templates: Sequence[str] = TEMPLATES
) -> np.ndarray:
    """(L, E) unit embeddings: each label through every template, averaged, renormalised."""
    prompts = [t.format(label) for label in labels for t in templates]
    emb = torch.from_numpy(embed_text_list(model, prompts)).view(len(labels), len(templates), -1).mean(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


def zero_shot(image_emb: np.ndarray, label_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted label index (N,), cosine similarities (N, L)) by nearest label embedding."""
    sims = image_emb @ label_emb.T
    return sims.argmax(1), sims


def _write_embeddings(out: Path, emb: np.ndarray, index: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "embeddings.npy", emb)
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")


def main_embed(argv: list[str] | None = None) -> int:
    """`vistune embed`: write L2-normalised embeddings of a folder of images or a file of texts."""
    p = argparse.ArgumentParser(prog="vistune embed", description=main_embed.__doc__)
    p.add_argument("model_dir", help="a contrastive model directory (vistune contrastive --out)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of images (searched recursively)")
    src.add_argument("--texts", help="UTF-8 text file, one text per line (blank lines are not texts)")
    p.add_argument("--out", required=True, help="output folder for embeddings.npy and index.json")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    model = load_contrastive(args.model_dir)
    if args.images:
        index = list_images(args.images)
        emb = embed_image_files(model, args.images, index, args.batch_size)
    else:
        index = [line for line in Path(args.texts).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not index:
            raise ValueError(f"{args.texts}: no texts")
        emb = embed_text_list(model, index, args.batch_size)
    _write_embeddings(Path(args.out), emb, index)
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {args.out}")
    return 0


def _accuracy(names: list[str], preds: np.ndarray, labels: list[str]) -> float | None:
    """Accuracy when every image sits in a folder named after one of the labels (ImageFolder), else None."""
    truth = [Path(n).parent.name for n in names]
    if not all(t in labels for t in truth):
        return None
    return float(np.mean([labels[i] == t for i, t in zip(preds, truth, strict=True)]))


def main_classify(argv: list[str] | None = None) -> int:
    """`vistune classify`: zero-shot classification of a folder of images against text labels."""
    p = argparse.ArgumentParser(prog="vistune classify", description=main_classify.__doc__)
    p.add_argument("model_dir", help="a contrastive model directory")
    p.add_argument("--images", required=True, help="folder of images (an ImageFolder also gets accuracy)")
    p.add_argument("--labels", required=True, help='comma-separated labels, e.g. "red circle,blue star"')
    p.add_argument(
        "--template", action="append", help="prompt template with {} (repeatable); default: 4 built-in"
    )
    p.add_argument("--out", help="write predictions.jsonl and metrics.json here")
    args = p.parse_args(argv)
    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    if len(labels) < 2:
        raise ValueError(f"--labels: need at least two labels, got {labels}")
    model = load_contrastive(args.model_dir)
    names = list_images(args.images)
    preds, sims = zero_shot(
        embed_image_files(model, args.images, names),
        label_embeddings(model, labels, args.template or TEMPLATES),
    )
    rows = [
        {"image": n, "label": labels[i], "score": float(s[i])}
        for n, i, s in zip(names, preds, sims, strict=True)
    ]
    acc = _accuracy(names, preds, labels)
    for row in rows[:20]:
        print(f"{row['image']}\t{row['label']}\t{row['score']:.3f}")
    print(
        f"{len(rows)} images"
        + (f"; accuracy {acc:.4f} (chance {1 / len(labels):.4f})" if acc is not None else "")
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        metrics = {"images": len(rows), "labels": labels, "accuracy": acc, "chance": 1 / len(labels)}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return 0
