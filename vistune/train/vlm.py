"""The `vlm` stage kind: next-token loss on the assistant tokens of conversations (with or without images).

LoRA (`lora` in the stage's `train`) wraps the LLM with peft adapters on every linear layer, or only
on the top `stage.lora_layers` decoder layers (the backward pass then stops below them); they are
merged back at the stage's end. When the stage leaves the vision tower frozen, its features are
computed once per image and cached, with the tower in eval mode (a frozen tower's BatchNorm uses its
running statistics, as at inference, not those of whichever image passes through).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from vistune.config import Stage
from vistune.data.images import load_image
from vistune.model.template import IGNORE
from vistune.model.vlm import VLM
from vistune.train.conversations import ConversationData, collate
from vistune.train.objective import StageContext


def add_lora(model: VLM, stage: Stage) -> None:
    """Wrap `model.llm` with peft LoRA adapters as the stage asks (all linear layers, or the top N)."""
    targets, layers = "all-linear", None
    if stage.lora_layers is not None:
        total = model.llm.config.num_hidden_layers
        if not 1 <= stage.lora_layers <= total:
            raise ValueError(f"stage {stage.name!r}: lora_layers must be 1..{total}, got {stage.lora_layers}")
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


class VLMObjective(nn.Module):
    """Summed next-token cross-entropy over the answer tokens of a stage's conversations."""

    def __init__(self, stage: Stage, model: VLM, ctx: StageContext):
        super().__init__()
        if "lora" in stage.train and not isinstance(model.llm, PeftModel):
            add_lora(model, stage)
        self.model = model
        self.device = ctx.device
        self.data = ConversationData(
            stage.data, model.tokenizer, model.image_tokens, stage.max_length, stage.on_bad_record
        )
        self._lengths = tuple(len(s.input_ids) for s in self.data.samples)
        self.cache = "vision" not in stage.train
        model.vision.train(not self.cache)
        self._features: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> Sequence[int]:
        return self._lengths

    def describe(self) -> dict[str, Any]:
        return {"records": dict(self.data.counts), "tokens": self.data.num_tokens(), "cache": self.cache}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        llm = self.model.llm
        return {
            "vision": list(self.model.vision.parameters()),
            "projector": list(self.model.projector.parameters()),
            "llm": list(llm.parameters()),
            "lora": [p for n, p in llm.named_parameters() if "lora_" in n]
            if isinstance(llm, PeftModel)
            else [],
        }

    def batch(self, indices: list[int]) -> dict[str, Any]:
        out = collate([self.data[i] for i in indices], self.model.tokenizer.pad_token_id)
        paths = out.pop("images")
        out = {k: v.to(self.device) for k, v in out.items()}
        if paths and self.cache:
            out["vision_features"] = self._cached(paths)
        elif paths:
            out["pixel_values"] = self._pixels(paths)
        return out

    def _pixels(self, paths: list[Path]) -> torch.Tensor:
        return self.model.vision.preprocess([load_image(p) for p in paths]).to(self.device)

    @torch.no_grad()
    def _cached(self, paths: list[Path]) -> torch.Tensor:
        """(B_img, N, D) tower features, computing only the images not seen before.

        One image per forward pass: batched CPU kernels differ in the last bits with the batch's size
        and company, so a feature must not depend on which images it was first seen with, or a resumed
        run (whose cache fills in other batches) would not end with the same weights (~2 ms per image)."""
        for path in dict.fromkeys(str(p) for p in paths if str(p) not in self._features):
            self._features[path] = self.model.vision(self._pixels([path]))[0]
        return torch.stack([self._features[str(p)] for p in paths])

    def count(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE).sum())

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.loss_sum(**batch)

    def finish(self) -> None:
        if isinstance(self.model.llm, PeftModel):
            self.model.llm = self.model.llm.merge_and_unload()
