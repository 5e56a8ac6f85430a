"""Supervised image classification on an ImageFolder: linear probe on frozen features, or full fine-tune.

DATA holds train/, val/ and test/ folders of class sub-folders (`vistune data synth --imagefolder` writes
one). `probe` fits scikit-learn's LogisticRegression on the frozen tower's mean-pooled features;
`finetune` trains the tower and a linear head with cross-entropy (AdamW, warmup + cosine). Both report
test accuracy, per-class recall and a confusion matrix (metrics.json + confusion.png). `finetune` also
saves `vision.safetensors` (the tower, loadable as `VisionConfig.weights` / `--vision-weights`),
`head.safetensors` and `vistune.json`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vistune.config import VISION_KINDS, VisionConfig
from vistune.vision import VisionTower, build_vision_tower

MODES = ("probe", "finetune")
SPLITS = ("train", "val", "test")


class FolderData(torch.utils.data.Dataset):
    """(pixels, class index) for every image of one ImageFolder split, classes fixed by the caller."""

    def __init__(self, root: Path, classes: list[str], preprocess: Any) -> None:
        from vistune.data.llava import load_records

        self.records = load_records(root)
        unknown = sorted(set(self.records.classes) - set(classes))
        if unknown:
            raise ValueError(
                f"{root}: class folder(s) {unknown} are not among the training classes {classes}"
            )
        self.root, self.classes, self.preprocess = root, classes, preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from vistune.data.images import load_image

        record = self.records[index]
        image = load_image(self.root / record.images[0])
        return self.preprocess([image])[0], self.classes.index(record.meta["label"])


def _splits(data: Path, tower: VisionTower, limit: int | None) -> dict[str, FolderData]:
    """The three splits, with classes taken from train/."""
    from vistune.data.llava import load_records

    missing = [s for s in SPLITS if not (data / s).is_dir()]
    if missing:
        raise ValueError(f"{data}: missing split folder(s) {missing}; expected {list(SPLITS)}")
    classes = load_records(data / "train").classes
    out = {s: FolderData(data / s, classes, tower.preprocess) for s in SPLITS}
    for ds in out.values():
        if limit and len(ds.records) > limit:
            ds.records = _spread(ds.records, limit)
    return out


def _spread(records: Any, limit: int) -> list:
    """`limit` records spread evenly over the (class-sorted) list, so every class keeps some."""
    return [records[int(i)] for i in np.linspace(0, len(records) - 1, limit).round()]


def _loader(ds: FolderData, batch_size: int, shuffle: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


@torch.no_grad()
def features(tower: VisionTower, ds: FolderData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Mean-pooled frozen features (N, D) and labels (N,) of a split."""
    tower.eval()
    xs, ys = [], []
    for pixels, labels in _loader(ds, batch_size, shuffle=False):
        xs.append(tower(pixels).mean(1).float().cpu().numpy())
        ys.append(labels.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def linear_probe(tower: VisionTower, splits: dict[str, FolderData], batch_size: int = 64) -> dict[str, Any]:
    """Standardise frozen features and fit LogisticRegression on train; predictions for val and test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    feats = {s: features(tower, ds, batch_size) for s, ds in splits.items()}
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(*feats["train"])
    return {s: (clf.predict(feats[s][0]), feats[s][1]) for s in ("val", "test")}


class Classifier(nn.Module):
    """Vision tower -> mean over tokens -> Linear -> class logits."""

    def __init__(self, tower: VisionTower, n_classes: int) -> None:
        super().__init__()
        self.tower, self.head = tower, nn.Linear(tower.hidden_size, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels).mean(1))


@torch.no_grad()
def predict(model: Classifier, ds: FolderData, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, labels) of a split, in eval mode."""
    model.eval()
    preds, ys = [], []
    for pixels, labels in _loader(ds, batch_size, shuffle=False):
        preds.append(model(pixels).argmax(1).numpy())
        ys.append(labels.numpy())
    return np.concatenate(preds), np.concatenate(ys)


def fine_tune(
    tower: VisionTower, splits: dict[str, FolderData], epochs: int, batch_size: int, lr: float
) -> tuple[Classifier, dict[str, Any]]:
    """Train tower + head with cross-entropy; return the model and val/test predictions."""
    from transformers import get_cosine_schedule_with_warmup

    model = Classifier(tower, len(splits["train"].classes))
    loader = _loader(splits["train"], batch_size, shuffle=True)
    steps = epochs * len(loader)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, steps // 20), steps)
    for epoch in range(epochs):
        model.train()
        total, start = 0.0, time.perf_counter()
        for pixels, labels in loader:
            loss = nn.functional.cross_entropy(model(pixels), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        val_pred, val_y = predict(model, splits["val"], batch_size)
        print(
            f"epoch {epoch + 1}/{epochs}: train loss {total / len(loader):.4f}, "
            f"val accuracy {np.mean(val_pred == val_y):.4f} ({time.perf_counter() - start:.0f} s)"
        )
    return model, {s: predict(model, splits[s], batch_size) for s in ("val", "test")}


def score(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Accuracy, per-class recall and the confusion matrix (rows: true class, columns: predicted)."""
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(truth, pred, labels=list(range(len(classes))))
    support = cm.sum(1)
    recall = {c: (float(cm[i, i] / support[i]) if support[i] else None) for i, c in enumerate(classes)}
    return {
        "accuracy": float(np.mean(pred == truth)),
        "per_class_recall": recall,
        "confusion": cm.tolist(),
        "n": int(len(truth)),
    }


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    """Write the confusion matrix as an annotated PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(1.2 * len(classes) + 2, 1.2 * len(classes) + 1.5))
    ax.imshow(arr, cmap="Blues")
    ax.set(
        xticks=range(len(classes)),
        yticks=range(len(classes)),
        xticklabels=classes,
        yticklabels=classes,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for (i, j), v in np.ndenumerate(arr):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > arr.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _save_finetuned(model: Classifier, out: Path, classes: list[str]) -> None:
    from safetensors.torch import save_file

    save_file(
        {k: v.contiguous() for k, v in model.tower.model.state_dict().items()},
        str(out / "vision.safetensors"),
    )
    save_file({k: v.contiguous() for k, v in model.head.state_dict().items()}, str(out / "head.safetensors"))
    meta = {
        "type": "classifier",
        "classes": classes,
        "vision": asdict(model.tower.config),
        "vision_arch": model.tower.arch(),
    }
    (out / "vistune.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def _tower(args: argparse.Namespace) -> VisionTower:
    """The tower to probe or fine-tune: from a contrastive model directory, or built from the flags."""
    if args.contrastive:
        from vistune.contrastive import load_contrastive

        return load_contrastive(args.contrastive).vision
    cfg = VisionConfig(
        kind=args.tower, name_or_path=args.vision, weights=args.vision_weights, image_size=args.image_size
    )
    return build_vision_tower(cfg)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune classifier", description="Supervised image classification.")
    p.add_argument("--data", required=True, help="folder with train/, val/, test/ ImageFolder splits")
    p.add_argument("--out", required=True, help="output folder (metrics.json, confusion.png, weights)")
    p.add_argument("--mode", choices=MODES, default="probe")
    p.add_argument("--tower", choices=VISION_KINDS, default="resnet", help="vision tower kind")
    p.add_argument("--vision", help="pretrained tower: hub id or local directory")
    p.add_argument("--vision-weights", help="safetensors state dict of the tower, saved by vistune")
    p.add_argument("--contrastive", help="use the vision tower of this contrastive model directory")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--limit", type=int, help="use at most N images per split (spread over classes)")
    p.add_argument("--seed", type=int, default=0)
    return p


def main_train_classifier(argv: list[str] | None = None) -> int:
    """`vistune classifier`: linear probe or fine-tune a vision tower on an ImageFolder; score on test."""
    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tower = _tower(args)
    splits = _splits(Path(args.data), tower, args.limit)
    classes = splits["train"].classes
    start = time.perf_counter()
    if args.mode == "probe":
        preds = linear_probe(tower, splits, args.batch_size)
    else:
        model, preds = fine_tune(tower, splits, args.epochs, args.batch_size, args.lr)
        _save_finetuned(model, out, classes)
    report = {s: score(*preds[s], classes) for s in ("val", "test")}
    report.update(
        mode=args.mode,
        classes=classes,
        chance=1 / len(classes),
        seconds=time.perf_counter() - start,
        train_images=len(splits["train"]),
    )
    (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot_confusion(report["test"]["confusion"], classes, out / "confusion.png", f"{args.mode}: test")
    print(
        f"{args.mode}: test accuracy {report['test']['accuracy']:.4f} (val {report['val']['accuracy']:.4f}, "
        f"chance {1 / len(classes):.4f}); wrote {out / 'metrics.json'}"
    )
    return 0
