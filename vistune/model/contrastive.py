"""Contrastive image-text model (CLIP / SigLIP style) and its losses, with cross-process negatives.

    image (B, 3, H, W) -> vision tower (B, N, Dv) -> mean over tokens -> Linear -> L2 norm  (B, E)
    text  (B,)         -> text tower (B, Dt), masked mean            -> Linear -> L2 norm  (B, E)

Losses take L2-normalised embeddings and the *exponentiated* temperature (`scale`, a multiplier):
`clip_loss` is CLIP's symmetric InfoNCE; `siglip_loss` is SigLIP's pairwise sigmoid loss with a learned
bias. The `gathered_*` variants all-gather the other processes' embeddings as extra negatives with
`torch.distributed.nn.functional.all_gather`, which keeps gradients; each process scores its own rows
against the global batch, so the mean over processes equals the single-process loss on that batch.
Saved models are a directory: model.safetensors + vistune.json (+ tokenizer/).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn
from torch.distributed.nn.functional import all_gather

from vistune.config import VisionConfig
from vistune.model.text_tower import TextTower, text_tower_from_arch
from vistune.model.vision import VisionTower, build_vision_tower

LOSSES = ("clip", "siglip")
CONFIG_FILE = "vistune.json"
WEIGHTS_FILE = "model.safetensors"
MAX_SCALE = 100.0  # CLIP clamps the learned temperature so logits cannot blow up


def clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy; pair i is row i of both."""
    logits = scale * img @ txt.T  # (B, B)
    labels = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Sigmoid loss: every (image, text) pair is a binary match / no-match; summed, divided by B."""
    logits = scale * img @ txt.T + bias  # (B, B)
    signs = 2 * torch.eye(len(img), device=img.device, dtype=logits.dtype) - 1  # +1 on the diagonal
    return -F.logsigmoid(signs * logits).sum() / len(img)


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate x (B, E) from every process in rank order, keeping gradients; x itself if alone."""
    if _world()[1] == 1:
        return x
    return torch.cat(all_gather(x), dim=0)


def gathered_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP loss of this process's rows against the global batch (equal-sized local batches)."""
    rank, _ = _world()
    all_img, all_txt = gather(img), gather(txt)
    labels = torch.arange(len(img), device=img.device) + rank * len(img)
    i2t = F.cross_entropy(scale * img @ all_txt.T, labels)
    t2i = F.cross_entropy(scale * txt @ all_img.T, labels)
    return (i2t + t2i) / 2


def gathered_siglip_loss(
    img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP loss of this process's images against every process's texts (equal-sized local batches)."""
    rank, _ = _world()
    logits = scale * img @ gather(txt).T + bias  # (B_local, B_global)
    signs = -torch.ones_like(logits)
    idx = torch.arange(len(img), device=img.device)
    signs[idx, idx + rank * len(img)] = 1.0
    return -F.logsigmoid(signs * logits).sum() / len(img)


class ContrastiveModel(nn.Module):
    """Vision tower + text tower + linear projections into a shared, L2-normalised embedding space."""

    def __init__(
        self, vision: VisionTower, text: TextTower, embed_dim: int = 128, loss: str = "clip"
    ) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"contrastive loss {loss!r} is not one of {LOSSES}")
        self.vision, self.text, self.embed_dim, self.loss_name = vision, text, embed_dim, loss
        self.image_proj = nn.Linear(vision.hidden_size, embed_dim, bias=False)
        self.text_proj = nn.Linear(text.hidden_size, embed_dim, bias=False)
        # Initial temperatures from the papers: CLIP 1/0.07; SigLIP scale 10 and bias -10.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07 if loss == "clip" else 10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if loss == "siglip" else None
        self.text_cache: dict[str, torch.Tensor] | None = None  # set to {} to memoise a locked text tower

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) preprocessed pixels -> (B, E) unit vectors."""
        pooled = self.vision(pixel_values).mean(dim=1)  # (B, N, Dv) -> (B, Dv)
        return F.normalize(self.image_proj(pooled), dim=-1)

    def text_features(self, texts: list[str]) -> torch.Tensor:
        """(B, Dt) pooled text-tower features; memoised per text when `text_cache` is a dict (LiT)."""
        if self.text_cache is None:
            return self.text.encode(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.text_cache]
        if missing:
            with torch.no_grad():
                self.text_cache.update(zip(missing, self.text.encode(missing), strict=True))
        return torch.stack([self.text_cache[t] for t in texts])

    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """(B,) texts -> (B, E) unit vectors."""
        return F.normalize(self.text_proj(self.text_features(texts)), dim=-1)

    @torch.no_grad()
    def embed_images(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (B, E) unit vectors (no grad)."""
        return self.image_embeddings(self.vision.preprocess(images))

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Texts -> (B, E) unit vectors (no grad)."""
        return self.text_embeddings(texts)

    def scale(self) -> torch.Tensor:
        """The temperature multiplier exp(logit_scale), clamped at MAX_SCALE."""
        return self.logit_scale.exp().clamp(max=MAX_SCALE)

    def loss(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """This model's loss on unit embeddings, with other processes' negatives when distributed."""
        if self.loss_name == "clip":
            return gathered_clip_loss(img, txt, self.scale())
        return gathered_siglip_loss(img, txt, self.scale(), self.logit_bias)


def save_contrastive(
    model: ContrastiveModel, out_dir: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write model.safetensors, vistune.json (architecture + config) and tokenizer/ into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS_FILE))  # handles tied / shared tensors
    model.text.tokenizer.save_pretrained(out / "tokenizer")
    meta = {
        "type": "contrastive",
        "loss": model.loss_name,
        "embed_dim": model.embed_dim,
        "vision": asdict(model.vision.config),
        "vision_arch": model.vision.arch(),
        "text_arch": model.text.arch(),
        **(extra or {}),
    }
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_contrastive(model_dir: str | Path, device: str | torch.device = "cpu") -> ContrastiveModel:
    """Rebuild a saved ContrastiveModel offline from its directory and load its weights, in eval mode."""
    path = Path(model_dir)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path / CONFIG_FILE}: not a vistune contrastive model ({err})") from err
    if meta.get("type") is None and "vision_arch" in meta:
        raise ValueError(
            f"{path}: a vision-language model, not a contrastive (image-text) model; retrieval and "
            "embeddings need one written by `vistune contrastive` or a contrastive stage (OUT/stages/NAME)"
        )
    if meta.get("type") != "contrastive":
        raise ValueError(f"{path / CONFIG_FILE}: type is {meta.get('type')!r}, expected 'contrastive'")
    vcfg = VisionConfig(**{**meta["vision"], "name_or_path": None, "weights": None})
    vision = build_vision_tower(vcfg, arch=meta["vision_arch"])
    text = text_tower_from_arch(meta["text_arch"], path / "tokenizer")
    model = ContrastiveModel(vision, text, meta["embed_dim"], meta["loss"])
    load_model(model, str(path / WEIGHTS_FILE), device=str(device))
    return model.to(device).eval()
