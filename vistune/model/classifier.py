"""An image classifier: a vision tower, mean-pooled, then a linear head; saved as safetensors + JSON.

`vision.safetensors` holds the tower (loadable as `VisionConfig.weights` / `--vision-weights`),
`head.safetensors` the head, `vistune.json` the classes and the tower's architecture.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from vistune.model.vision import VisionTower


class Classifier(nn.Module):
    """Vision tower -> mean over tokens -> Linear -> class logits."""

    def __init__(self, tower: VisionTower, n_classes: int) -> None:
        super().__init__()
        self.tower, self.head = tower, nn.Linear(tower.hidden_size, n_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, classes) logits."""
        return self.head(self.tower(pixels).mean(1))


def save_classifier(model: Classifier, out: Path, classes: list[str]) -> None:
    """Write vision.safetensors, head.safetensors and vistune.json into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    tower = {k: v.detach().contiguous().cpu() for k, v in model.tower.model.state_dict().items()}
    save_file(tower, str(out / "vision.safetensors"))
    head = {k: v.detach().contiguous().cpu() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / "head.safetensors"))
    meta = {
        "type": "classifier",
        "classes": classes,
        "vision": asdict(model.tower.config),
        "vision_arch": model.tower.arch(),
    }
    (out / "vistune.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
