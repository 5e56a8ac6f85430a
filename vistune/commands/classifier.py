"""`vistune classifier`: a vision tower as an ImageFolder classifier, probed or fine-tuned, scored on test.

DATA holds train/ and test/ (and optionally val/) folders of class sub-folders (`vistune data digits`
writes one in OUT/imagefolder). `probe` fits scikit-learn's LogisticRegression on the frozen tower's
mean-pooled features; `finetune` trains the tower and a linear head with cross-entropy through the
training loop (the `classify` stage kind, `vistune.train.classifier`: warmup + cosine AdamW,
checkpoints and `--resume` in OUT). Both report test accuracy, per-class precision, recall and F1 and
a confusion matrix (metrics.json + confusion.png); `finetune` also saves the classifier
(`vistune.model.classifier`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vistune.config import PREPROCESS, VISION_KINDS, Augment, ClassifyOptions, Stage, VisionConfig
from vistune.eval.metrics import classification_metrics, save_confusion_png
from vistune.model.classifier import Classifier, save_classifier
from vistune.model.contrastive import load_contrastive
from vistune.model.vision import VisionTower, build_vision_tower
from vistune.train.classifier import ClassifierObjective, FolderData, folder_classes
from vistune.train.kinds import needs_unused_parameters
from vistune.train.loop import open_run, run_stages
from vistune.train.objective import pixel_fn

MODES = ("probe", "finetune")
SPLITS = ("train", "val", "test")


def _splits(data: Path, tower: VisionTower, limit: int | None, val_share: float) -> dict[str, FolderData]:
    """The three splits, with classes taken from train/. Without a val/ folder, `val_share` of every
    class of train/ (the last images of each, in name order) is held out as val."""
    missing = [s for s in ("train", "test") if not (data / s).is_dir()]
    if missing:
        raise ValueError(f"{data}: missing split folder(s) {missing}; expected train/, test/ (and val/)")
    classes = folder_classes(data / "train")
    splits = {s: FolderData(data / s, classes, pixel_fn(tower), limit) for s in SPLITS if (data / s).is_dir()}
    if "val" not in splits:
        splits["train"], splits["val"] = splits["train"].split(val_share)
    return splits


def _loader(ds: FolderData, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def features(tower: VisionTower, ds: FolderData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled frozen features (N, D) and labels (N,) of a split."""
    tower.eval()
    xs, ys = [], []
    for pixels, labels in _loader(ds, batch_size):
        xs.append(tower(pixels).mean(1).float().cpu().numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def linear_probe(tower: VisionTower, splits: dict[str, FolderData], batch_size: int = 64) -> dict[str, Any]:
    """Standardise frozen features and fit LogisticRegression on train; predictions for val and test."""
    feats = {s: features(tower, ds, batch_size) for s, ds in splits.items()}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(*feats["train"])
    return {s: (clf.predict(feats[s][0]), feats[s][1]) for s in ("val", "test")}


@torch.no_grad()
def predict(model: Classifier, ds: FolderData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of a split, in eval mode."""
    model.eval()
    preds, ys = [], []
    for pixels, labels in _loader(ds, batch_size):
        preds.append(model(pixels.to(next(model.parameters()).device)).argmax(1).cpu().numpy())
        ys.append(labels.numpy())
    return np.concatenate(preds), np.concatenate(ys)


def _tower(args: argparse.Namespace) -> VisionTower:
    """The tower to probe or fine-tune: from a contrastive model directory, or built from the flags."""
    if args.contrastive:
        return load_contrastive(args.contrastive).vision
    sizes = {"resnet_depths": args.resnet_depths, "resnet_widths": args.resnet_widths}
    cfg = VisionConfig(
        kind=args.tower, name_or_path=args.vision, weights=args.vision_weights,
        image_size=args.image_size, preprocess=args.preprocess,
        **{k: v for k, v in sizes.items() if v is not None},
    )  # fmt: skip
    return build_vision_tower(cfg)


def _fine_tune(
    tower: VisionTower, splits: dict[str, FolderData], args: argparse.Namespace
) -> tuple[Classifier, dict[str, Any]]:
    """Train tower + head through the training loop (run dir OUT); predictions for val and test."""
    model = Classifier(tower, len(splits["train"].classes))
    stage = Stage(
        name="finetune", kind="classify", train=["vision"], lr=args.lr, epochs=args.epochs,
        batch_size=args.batch_size, weight_decay=0.01, warmup_ratio=0.05,
        options=ClassifyOptions(Augment(shrink=args.shrink)),
    )  # fmt: skip
    run = open_run(
        Path(args.out), args.seed, 200, 1, resume=args.resume, overwrite=args.overwrite,
        find_unused_parameters=needs_unused_parameters([stage]),
    )  # fmt: skip
    augment = stage.options.augment
    build = lambda s: ClassifierObjective(model, splits["train"], run.accelerator.device, augment=augment)  # noqa: E731
    run_stages([stage], model, build, run, resume=args.resume)
    run.log.close()
    return model, {s: predict(model, splits[s], args.batch_size) for s in ("val", "test")}


def _ints(text: str) -> list[int]:
    """'2,2,2' -> [2, 2, 2] (argparse type)."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune classifier", description="Supervised image classification.")
    p.add_argument("--data", required=True, help="folder with train/, test/ and optionally val/ ImageFolders")
    p.add_argument("--out", required=True, help="output folder (metrics.json, confusion.png, weights)")
    p.add_argument("--mode", choices=MODES, default="probe")
    p.add_argument("--tower", choices=VISION_KINDS, default="resnet", help="vision tower kind")
    p.add_argument("--vision", help="pretrained tower: hub id or local directory")
    p.add_argument("--vision-weights", help="safetensors state dict of the tower, saved by vistune")
    p.add_argument("--contrastive", help="use the vision tower of this contrastive model directory")
    p.add_argument("--resnet-depths", type=_ints, help="from-scratch ResNet: blocks per stage, e.g. 2,2,2")
    p.add_argument("--resnet-widths", type=_ints, help="from-scratch ResNet: channels per stage")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--preprocess", choices=PREPROCESS, default="pad", help="how images are made square")
    p.add_argument("--epochs", type=float, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, help="use at most N images per split (spread over classes)")
    p.add_argument("--val-share", type=float, default=0.1,
                   help="without a val/ folder: the share of each train/ class held out")  # fmt: skip
    p.add_argument("--shrink", type=float, default=0.0,
                   help="finetune: images shrunk by up to this share, anywhere (augment.shrink)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="finetune: continue from the last checkpoint in OUT")
    p.add_argument("--overwrite", action="store_true", help="finetune: replace a previous run in OUT")
    return p


def main_train_classifier(argv: list[str] | None = None) -> int:
    """`vistune classifier`: linear probe or fine-tune a vision tower on an ImageFolder; score on test."""
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tower = _tower(args)
    splits = _splits(Path(args.data), tower, args.limit, args.val_share)
    classes = splits["train"].classes
    start = time.perf_counter()
    if args.mode == "probe":
        preds = linear_probe(tower, splits, args.batch_size)
    else:
        model, preds = _fine_tune(tower, splits, args)
        save_classifier(model, out, classes)
    report: dict[str, Any] = {
        s: classification_metrics(
            [classes[i] for i in preds[s][0]], [classes[i] for i in preds[s][1]], classes
        )
        for s in ("val", "test")
    }
    report |= {"mode": args.mode, "classes": classes, "chance": 1 / len(classes),
               "seconds": time.perf_counter() - start, "train_images": len(splits["train"])}  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    save_confusion_png(report["test"]["confusion"], out / "confusion.png", f"{args.mode}: test")
    print(
        f"{args.mode}: test accuracy {report['test']['accuracy']:.4f} (val {report['val']['accuracy']:.4f}, "
        f"chance {1 / len(classes):.4f}); wrote {out / 'metrics.json'}"
    )
    return 0
