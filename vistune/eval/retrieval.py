"""Image-text retrieval recall@k for contrastive models, with several captions per image.

i2t: an image scores a hit at k when any of its captions is among the k texts most similar to it.
t2i: a caption scores a hit at k when its image is among the k most similar images. Chance levels are
computed exactly for the same layout (random rankings). Ranks count strictly better candidates, so exact
ties go in the query's favour.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vistune.data.readers import caption_of, load_records
from vistune.eval.command import positive_int
from vistune.eval.paths import PathEscapeError, image_path
from vistune.infer.embed import embed_image_files, embed_text_list
from vistune.model.contrastive import load_contrastive


def recall_at_k(
    image_emb: np.ndarray,
    text_emb: np.ndarray,
    k: Sequence[int] = (1, 5, 10),
    text_image: Sequence[int] | None = None,
) -> dict[str, float]:
    """Recall@k both ways. text_image[j] is the image index of text j (default: text j <-> image j)."""
    owner = np.arange(len(text_emb)) if text_image is None else np.asarray(text_image)
    if len(owner) != len(text_emb) or owner.min(initial=0) < 0 or owner.max(initial=0) >= len(image_emb):
        raise ValueError(
            f"text_image must map each of {len(text_emb)} texts to one of {len(image_emb)} images"
        )
    sims = image_emb @ text_emb.T  # (I, T)
    # t2i: rank of the true image among all images, per text (0 = best).
    true = sims[owner, np.arange(len(owner))]
    t2i_rank = (sims > true[None, :]).sum(0)  # images strictly better than the true one
    i2t_rank = _i2t_ranks(sims, owner, true)
    out: dict[str, float] = {}
    for kk in k:
        out[f"i2t_R@{kk}"] = float(np.mean(i2t_rank < kk))
        out[f"t2i_R@{kk}"] = float(np.mean(t2i_rank < kk))
    return out


def _i2t_ranks(sims: np.ndarray, owner: np.ndarray, true: np.ndarray) -> np.ndarray:
    """For each image with captions: how many texts score strictly above its best-scoring own caption."""
    best_own = np.full(sims.shape[0], -np.inf)
    np.maximum.at(best_own, owner, true)
    has = np.bincount(owner, minlength=sims.shape[0]) > 0
    return (sims > best_own[:, None]).sum(1)[has]


def chance_at_k(
    n_images: int, captions_per_image: Sequence[int], k: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Expected recall@k of random rankings for the same numbers of images and captions."""
    n_texts = sum(captions_per_image)
    out = {}
    for kk in k:
        if kk >= n_texts:
            out[f"i2t_R@{kk}"] = 1.0
        else:  # P(no own caption among k random texts) = C(T - m, k) / C(T, k)
            miss = [math.comb(n_texts - m, kk) / math.comb(n_texts, kk) for m in captions_per_image if m]
            out[f"i2t_R@{kk}"] = float(1 - np.mean(miss))
        out[f"t2i_R@{kk}"] = min(1.0, kk / n_images)
    return out


def main_eval_retrieval(argv: list[str] | None = None) -> int:
    """`vistune eval --task retrieval`: recall@1/5/10 of a contrastive model on a pairs file."""
    p = argparse.ArgumentParser(prog="vistune eval --task retrieval", description=main_eval_retrieval.__doc__)
    p.add_argument("model_dir", help="a contrastive model directory")
    p.add_argument("--data", required=True, help="pairs JSONL (or LLaVA captions) of the held-out split")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--out", required=True, help="folder for metrics.json")
    p.add_argument("--limit", type=positive_int, help="use only the first N records")
    args = p.parse_args(argv)
    records = load_records(args.data, args.image_root)
    records = records[: args.limit] if args.limit else records
    if not records:
        raise ValueError(f"{args.data}: no records to evaluate")
    root = args.image_root or Path(args.data).parent
    images: dict[str, int] = {}
    texts, owner = [], []
    for record in records:
        if len(record.images) != 1:
            raise ValueError(f"{record.where()}: field images: retrieval pairs need exactly one image")
        try:
            image_path(root, record.images[0])
        except PathEscapeError as e:
            raise ValueError(f"{record.where()}: field 'image': {e}") from None
        owner.append(images.setdefault(record.images[0], len(images)))
        texts.append(caption_of(record))
    model = load_contrastive(args.model_dir)
    metrics = recall_at_k(
        embed_image_files(model, root, list(images)), embed_text_list(model, texts), text_image=owner
    )
    chance = chance_at_k(len(images), np.bincount(owner, minlength=len(images)).tolist())
    report = {"images": len(images), "texts": len(texts), "recall": metrics, "chance": chance}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for key, value in metrics.items():
        print(f"{key}\t{value:.4f}\t(chance {chance[key]:.4f})")
    return 0
