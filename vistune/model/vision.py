"""Vision towers: images -> (B, N, D) patch features, from HF CLIP / SigLIP vision models or a ResNet CNN.

`build_vision_tower(cfg)` picks the tower by `cfg.kind` ("clip", "siglip", "resnet"). Every tower has the
same small surface: `preprocess(images) -> (B, 3, H, W)`, `forward(pixels) -> (B, N, D)`, `hidden_size`,
`grid` (the (h, w) layout of the N tokens) and `arch()`, a JSON-able description that rebuilds the same
architecture offline (random init; the caller then loads its saved weights).

All three are transformers models (CLIPVisionModel, SiglipVisionModel, ResNetModel); timm is not used
because it hard-requires a torchvision that cannot import beside the pinned CPU torch. A ResNet's
(B, C, h, w) map is flattened row-major into h*w tokens; ResNet-18 at 64 px gives a 2x2 grid of 512-d.

`feature_layer` indexes `hidden_states` (-1 last, -2 LLaVA's choice); for a ResNet those are the stem
output followed by one map per stage. CLS: CLIP drops it unless `use_cls`; SigLIP and ResNets have none,
and `use_cls` is then an error.

Preprocessing makes each image the tower's square input by `config.preprocess` (squash, pad or crop:
`vistune.model.preprocess`) and normalises it with the tower's own mean/std (CLIP's, SigLIP's 0.5,
ImageNet's for ResNets, or those of a `preprocessor_config.json` beside pretrained weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from vistune.config import VisionConfig
from vistune.model.preprocess import preprocess

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
    "resnet": (IMAGENET_MEAN, IMAGENET_STD),
}


class VisionTower(nn.Module):
    """A vision backbone with its preprocessing; `forward` returns (B, N, D) token features.

    Attributes:
        config: the VisionConfig it was built from.
        model: the wrapped transformers vision model.
        hidden_size: D, the feature width.
        grid: (h, w) layout of the output tokens (CLS excluded).
        image_size: side of the square input the backbone expects.
    """

    def __init__(
        self, config: VisionConfig, model: nn.Module, image_size: int, norm: tuple[list, list] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.image_size = image_size
        self.mean, self.std = tuple(norm) if norm else _norm(config)
        self.grid, self.hidden_size = _probe(self)

    @property
    def num_tokens(self) -> int:
        """N, the number of feature tokens per image (CLS included when use_cls)."""
        return self.grid[0] * self.grid[1] + int(self.config.use_cls)

    def preprocess(self, images: list[Image.Image]) -> torch.Tensor:
        """Square each image by `config.preprocess`, scale to [0, 1], normalise: (B, 3, H, W) float32."""
        return preprocess(images, self.config.preprocess, self.image_size, self.mean, self.std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> (B, N, D) features from config.feature_layer."""
        param = next(self.model.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        states = self.model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        feats = states[self.config.feature_layer]
        if feats.dim() == 4:  # ResNet map (B, C, h, w) -> (B, h*w, C), row-major
            return feats.flatten(2).transpose(1, 2)
        if self.config.kind == "clip" and not self.config.use_cls:
            feats = feats[:, 1:]  # (B, 1 + h*w, D) -> (B, h*w, D)
        return feats

    def arch(self) -> dict[str, Any]:
        """JSON-able architecture and normalisation: what `build_vision_tower` needs to rebuild the tower."""
        return {
            "kind": self.config.kind,
            "hf_config": self.model.config.to_dict(),
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }


def _norm(cfg: VisionConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std: a local preprocessor_config.json beside pretrained weights wins, else the kind's values."""
    mean, std = NORMS[cfg.kind]
    proc = Path(cfg.name_or_path or "") / "preprocessor_config.json"
    if cfg.name_or_path and proc.is_file():
        data = json.loads(proc.read_text(encoding="utf-8"))
        mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
    return mean, std


@torch.no_grad()
def _probe(tower: VisionTower) -> tuple[tuple[int, int], int]:
    """Run one blank image to learn the (h, w) token grid and the feature width D."""
    was_training = tower.training
    tower.eval()  # no BatchNorm statistics updates from the probe
    x = torch.zeros(1, 3, tower.image_size, tower.image_size, dtype=next(tower.model.parameters()).dtype)
    feats = tower.model(pixel_values=x, output_hidden_states=True).hidden_states[tower.config.feature_layer]
    tower.train(was_training)
    if feats.dim() == 4:
        return (int(feats.shape[2]), int(feats.shape[3])), int(feats.shape[1])
    side = tower.image_size // tower.model.config.patch_size
    return (side, side), int(feats.shape[-1])


TOWER_CLASSES = {
    "clip": (tf.CLIPVisionConfig, tf.CLIPVisionModel),
    "siglip": (tf.SiglipVisionConfig, tf.SiglipVisionModel),
    "resnet": (tf.ResNetConfig, tf.ResNetModel),
}


def _hf_classes(kind: str) -> tuple[type, type]:
    """The transformers (config, model) classes of a tower kind."""
    if kind not in TOWER_CLASSES:
        raise ValueError(f"vision.kind {kind!r} is not one of {sorted(TOWER_CLASSES)}")
    return TOWER_CLASSES[kind]


def _fresh_hf_config(cfg: VisionConfig) -> Any:
    """A transformers config for a randomly initialised tower, from the VisionConfig size fields."""
    config_cls, _ = _hf_classes(cfg.kind)
    if cfg.kind == "resnet":  # basic blocks, as ResNet-18/34
        return config_cls(
            layer_type="basic",
            depths=list(cfg.resnet_depths),
            hidden_sizes=list(cfg.resnet_widths),
            embedding_size=cfg.resnet_widths[0],
        )
    hf_cfg = config_cls(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
    )
    if cfg.kind == "siglip":
        hf_cfg.vision_use_head = False  # the attention-pool head is unused by patch features
    return hf_cfg


def _check(cfg: VisionConfig, model: nn.Module) -> None:
    """Reject a feature_layer outside hidden_states and use_cls on towers without a CLS token."""
    n_states = len(model.config.depths) + 1 if cfg.kind == "resnet" else model.config.num_hidden_layers + 1
    if not -n_states <= cfg.feature_layer < n_states:
        raise ValueError(f"vision.feature_layer {cfg.feature_layer} is outside the {n_states} hidden states")
    if cfg.use_cls and cfg.kind != "clip":
        raise ValueError(f"vision.use_cls: kind {cfg.kind!r} has no CLS token; set use_cls false")


def load_tower_weights(tower: VisionTower, path: str | Path) -> None:
    """Load a safetensors state dict of `tower.model` (as saved by vistune), requiring every key to match."""
    state = load_file(str(path))
    missing, unexpected = tower.model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the tower: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def build_vision_tower(cfg: VisionConfig, arch: dict[str, Any] | None = None) -> VisionTower:
    """Build the tower `cfg.kind` names.

    `arch` (from `tower.arch()`) rebuilds a saved architecture with random init, ignoring name_or_path
    and weights (the caller loads its own). Otherwise `cfg.name_or_path` loads a pretrained model (hub
    id or local directory), else the size fields build a random one; then `cfg.weights`, a safetensors
    state dict of `tower.model`, is loaded over it.
    """
    config_cls, model_cls = _hf_classes(cfg.kind)
    if arch is not None:
        if arch.get("kind") != cfg.kind:
            raise ValueError(f"vision arch is for kind {arch.get('kind')!r} but vision.kind is {cfg.kind!r}")
        model, image_size = model_cls(config_cls.from_dict(arch["hf_config"])), arch["image_size"]
    elif cfg.name_or_path:
        try:
            model = model_cls.from_pretrained(cfg.name_or_path)
        except (OSError, ValueError) as err:  # no such dir, no config or weights, or a hub id while offline
            raise FileNotFoundError(
                f"vision.name_or_path {cfg.name_or_path!r}: cannot load a pretrained {cfg.kind} tower ({err})"
            ) from err
        image_size = getattr(model.config, "image_size", cfg.image_size)  # ResNets take any size
    else:
        model, image_size = model_cls(_fresh_hf_config(cfg)), cfg.image_size
    _check(cfg, model)
    norm = (arch["mean"], arch["std"]) if arch and "mean" in arch else None  # saved with the tower
    tower = VisionTower(cfg, model, image_size, norm)
    if cfg.weights and arch is None:
        load_tower_weights(tower, cfg.weights)
    return tower
