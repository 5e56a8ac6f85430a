"""What a stage trains and on what: trainable-module sets, and the `vlm` task (data + loss).

A task is an nn.Module the training loop wraps with accelerate: `batch(indices)` builds a micro-batch,
`count(batch)` says how many loss targets it holds, `forward(batch)` returns their summed loss, and
`finish()` runs once at the end of the stage.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from vistune.chat import IGNORE
from vistune.config import Stage
from vistune.data.images import load_image
from vistune.dataset import ConversationData, collate
from vistune.model import VLM


def set_trainable(model: VLM, stage: Stage) -> list[dict]:
    """Freeze everything, then unfreeze the stage's module sets; return optimizer param groups.

    `lora` wraps the LLM with peft adapters on every linear layer (merged back at the stage's end), or
    only on the top `stage.lora_layers` decoder layers: the backward pass then stops below them.
    """
    if "lora" in stage.train and not hasattr(model.llm, "peft_config"):
        targets, layers = "all-linear", None
        if stage.lora_layers is not None:
            total = model.llm.config.num_hidden_layers
            if not 1 <= stage.lora_layers <= total:
                raise ValueError(
                    f"stage {stage.name!r}: lora_layers must be 1..{total}, got {stage.lora_layers}"
                )
            layers = list(range(total - stage.lora_layers, total))
            # peft takes a layer subset only with module names: every linear inside the decoder layers
            targets = sorted(
                {
                    n.rsplit(".", 1)[-1]
                    for n, m in model.llm.named_modules()
                    if isinstance(m, nn.Linear) and ".layers." in n
                }
            )
        lora = LoraConfig(
            r=stage.lora_rank, lora_alpha=stage.lora_alpha, target_modules=targets, layers_to_transform=layers
        )
        model.llm = get_peft_model(model.llm, lora)
    model.requires_grad_(False)
    groups = []
    lr_vision = stage.lr_vision if stage.lr_vision is not None else stage.lr
    if "vision" in stage.train:
        groups.append({"params": list(model.vision.parameters()), "lr": lr_vision})
    other = []
    if "projector" in stage.train:
        other += list(model.projector.parameters())
    if "llm" in stage.train:
        other += list(model.llm.parameters())
    if "lora" in stage.train:
        other += [p for n, p in model.llm.named_parameters() if "lora_" in n]
    if other:
        groups.append({"params": other, "lr": stage.lr})
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)
    return groups


class VLMTask(nn.Module):
    """Next-token loss on assistant tokens of conversations (with or without images).

    When the stage leaves the vision tower frozen, its features are computed once per image and cached.
    """

    def __init__(self, stage: Stage, model: VLM, device: torch.device):
        super().__init__()
        self.model = model
        self.device = device
        self.data = ConversationData(
            stage.data, model.tokenizer, model.image_tokens, stage.max_length, stage.on_bad_record
        )
        self.lengths = tuple(len(self.data[i].input_ids) for i in range(len(self.data)))  # group_by_length
        self.cache = not any(p.requires_grad for p in model.vision.parameters())
        self._features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        return {"records": dict(self.data.counts), "tokens": self.data.num_tokens(), "cache": self.cache}

    def batch(self, indices: list[int]) -> dict:
        out = collate([self.data[i] for i in indices], self.model.tokenizer.pad_token_id)
        paths = out.pop("images")
        out = {k: v.to(self.device) for k, v in out.items()}
        if paths and self.cache:
            out["vision_features"] = self._cached(paths)
        elif paths:
            out["pixel_values"] = self._pixels(paths)
        return out

    def _pixels(self, paths: list) -> torch.Tensor:
        return self.model.vision.preprocess([load_image(p) for p in paths]).to(self.device)

    @torch.no_grad()
    def _cached(self, paths: list) -> torch.Tensor:
        """(B_img, N, D) tower features, computing only the images not seen before.

        One image per forward pass: batched CPU kernels differ in the last bits with the batch's size
        and company, so a feature must not depend on which images it was first seen with, or a resumed
        run (whose cache fills in other batches) would not end with the same weights (~2 ms per image)."""
        for path in dict.fromkeys(str(p) for p in paths if str(p) not in self._features):
            self._features[path] = self.model.vision(self._pixels([path]))[0]
        return torch.stack([self._features[str(p)] for p in paths])

    def count(self, batch: dict) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss_sum(**batch)

    def finish(self) -> None:
        if hasattr(self.model.llm, "merge_and_unload"):
            self.model.llm = self.model.llm.merge_and_unload()


def build_task(stage: Stage, model: VLM, device: torch.device) -> nn.Module:
    """The task for `stage.kind`."""
    if stage.kind == "vlm":
        return VLMTask(stage, model, device)
    if stage.kind == "scene":
        from vistune.scene import SceneTask

        return SceneTask(stage, model, device)
    raise ValueError(f"stage {stage.name!r}: kind {stage.kind!r} has no task in the VLM trainer")
