"""The `classify` stage kind and `vistune classifier`: a vision tower as an ImageFolder classifier.

DATA holds train/, val/ and test/ folders of class sub-folders (`vistune data synth --imagefolder` writes
one). `probe` fits scikit-learn's LogisticRegression on the frozen tower's mean-pooled features;
`finetune` trains the tower and a linear head with cross-entropy through the training loop (warmup +
cosine AdamW, checkpoints and `--resume` in OUT). Both report test accuracy, per-class precision,
recall and F1 and a confusion matrix (metrics.json + confusion.png); `finetune` also saves the
classifier (`vistune.model.classifier`). In a run's config, a `classify` stage trains the VLM's own
tower on an ImageFolder the same way, and drops the head afterwards.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.nn import functional as F

from vistune.config import PREPROCESS, VISION_KINDS, Augment, Stage, VisionConfig
from vistune.data.augment import augment
from vistune.data.images import load_image
from vistune.data.readers import load_records
from vistune.data.validate import ensure_valid
from vistune.eval.metrics import classification_metrics, save_confusion_png
from vistune.model.classifier import Classifier, save_classifier
from vistune.model.contrastive import load_contrastive
from vistune.model.vision import VisionTower, build_vision_tower
from vistune.model.vlm import VLM
from vistune.train.loop import open_run, run_stages
from vistune.train.objective import Batcher, StageContext, move_to, pixel_fn

MODES = ("probe", "finetune")
SPLITS = ("train", "val", "test")


class FolderData(torch.utils.data.Dataset):
    """(pixels, class index) for every image of one ImageFolder split, classes fixed by the caller.

    Every image is checked as training loads it: a bad one stops (`on_bad` "raise", naming it) or is
    skipped and counted in `skipped` ("skip")."""

    def __init__(
        self, root: Path, classes: list[str], preprocess: Any, limit: int | None = None, on_bad: str = "raise"
    ) -> None:
        records = load_records(root)
        unknown = sorted(set(records.classes) - set(classes))
        if unknown:
            raise ValueError(
                f"{root}: class folder(s) {unknown} are not among the training classes {classes}"
            )
        chosen = _spread(records, limit) if limit and len(records) > limit else list(records)
        cache: dict = {}
        self.records = [r for r in chosen if ensure_valid(r, root, on_bad=on_bad, cache=cache)]
        self.skipped = len(chosen) - len(self.records)
        self.root, self.classes, self.preprocess = root, classes, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def split(self, share: float) -> tuple[FolderData, FolderData]:
        """(kept, held out): the last `share` of each class's images (at least one) held out."""
        if not 0 < share < 1:
            raise ValueError(f"the held-out share must be between 0 and 1, got {share}")
        by_class: dict[str, list] = {}
        for record in self.records:
            by_class.setdefault(record.meta["label"], []).append(record)
        held = [r for rs in by_class.values() if len(rs) > 1 for r in rs[-max(1, round(share * len(rs))) :]]
        if not held:
            raise ValueError(f"{self.root}: too few images to hold out a validation share; add a val/ folder")
        ids = {id(r) for r in held}
        kept, out = copy.copy(self), copy.copy(self)
        kept.records, out.records = [r for r in self.records if id(r) not in ids], held
        return kept, out

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        record = self.records[index]
        image = load_image(self.root / record.images[0])
        return self.preprocess([image])[0], self.classes.index(record.meta["label"])


def _spread(records: Any, limit: int) -> list:
    """`limit` records spread evenly over the (class-sorted) list, so every class keeps some."""
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, limit).round()]


def folder_classes(root: Path) -> list[str]:
    """The class names of an ImageFolder (its sub-folders); at least two, or nothing can be learned."""
    classes = load_records(root).classes
    if len(classes) < 2:
        raise ValueError(f"{root}: {len(classes)} class folder(s) {classes}; a classifier needs at least 2")
    return classes


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


def folder_batch(data: FolderData, indices: list[int]) -> dict[str, Any]:
    """The classify objective's host part: (B, 3, H, W) pixels and (B,) class indices."""
    pixels, labels = zip(*(data[i] for i in indices), strict=True)
    return {"pixels": torch.stack(pixels), "labels": torch.tensor(labels)}


class ClassifierObjective(nn.Module):
    """Summed cross-entropy of a classifier on an ImageFolder split.

    `holds` is any other module a mid-stage checkpoint must restore (the run's VLM, whose tower this trains).
    `augment` applies to every image as it is drawn; it must keep the class true (a flip of a digit may not).
    """

    def __init__(
        self,
        model: Classifier,
        data: FolderData,
        device: torch.device,
        holds: nn.Module | None = None,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        self.model, self.data, self.device, self.holds = model.to(device), data, device, holds
        self.augment = augment or Augment()
        model.train()  # the tower and head learn: BatchNorm in training mode

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.data), "skipped_bad": self.data.skipped, "classes": self.data.classes}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """`vision`: the tower, and the head that scores it (new, dropped afterwards: it always learns)."""
        return {"vision": [*self.model.tower.parameters(), *self.model.head.parameters()]}

    def batcher(self) -> Batcher:
        return functools.partial(folder_batch, self.data)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return self.to_device(self.batcher()(indices))

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        pixels = batch["pixels"]
        if self.training and self.augment.active():
            tower = self.model.tower
            pixels, _ = augment(pixels, self.augment, tower.mean, tower.std)  # a class holds in any view
        return F.cross_entropy(self.model(pixels), batch["labels"], reduction="sum")

    def health(self) -> tuple[dict[str, float], str | None]:
        return {}, None

    def finish(self) -> None:
        """Nothing to hand on: the tower keeps what it learned, the head is dropped with the objective."""


def classify_stage(stage: Stage, model: VLM, ctx: StageContext) -> ClassifierObjective:
    """A run's `classify` stage: the VLM's tower with a new linear head on one ImageFolder."""
    if "projector" in stage.train:  # before, the head was the stage's `projector`
        raise ValueError(
            f"stage {stage.name!r}: a classify stage trains the tower with a head of its own, which "
            "always learns with it; the model's projector takes no part: use train: [vision]"
        )
    if len(stage.data) != 1 or not Path(stage.data[0].path).is_dir():
        raise ValueError(
            f"stage {stage.name!r}: a classify stage reads one ImageFolder directory as its data"
        )
    root = Path(stage.data[0].path)
    classes = folder_classes(root)
    data = FolderData(root, classes, pixel_fn(model.vision), stage.data[0].limit, stage.on_bad_record)
    return ClassifierObjective(
        Classifier(model.vision, len(classes)), data, ctx.device, holds=model, augment=stage.augment
    )


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
    )  # fmt: skip
    run = open_run(Path(args.out), args.seed, 200, 1, resume=args.resume, overwrite=args.overwrite)
    augment = Augment(shrink=args.shrink)
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
