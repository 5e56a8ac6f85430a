"""The `vlm` stage kind: next-token loss on the assistant tokens of conversations (with or without images).

LoRA (`lora` in the stage's `train`) wraps the LLM with peft adapters on every linear layer, or only
on the top `stage.lora_layers` decoder layers (the backward pass then stops below them); they are
merged back at the stage's end. A frozen vision tower runs in eval mode (its BatchNorm uses the running
statistics, as at inference) and without gradients; its features are computed once per image and kept
on the stage's device when the stage's images fit in `FEATURE_CACHE_GB` (or as
`options.cache_features` says). Features are computed inside `forward`, so a wrapped model (DDP, FSDP)
is in charge of its weights. Batches are built on the CPU (`ConversationBatcher`, in DataLoader workers
with `stage.workers`) with everything the step needs (the answer positions, the loss-target count), so
a step on a GPU reads nothing back to the host. With `options.pack` a micro-batch's records share rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn

from vistune.config import Stage
from vistune.data.images import load_image
from vistune.model.vlm import VLM, answer_targets, check_image_tokens
from vistune.train.conversations import ConversationData, collate, collate_packed
from vistune.train.drift import ImageDrift
from vistune.train.objective import StageContext, move_to, pixel_fn

FEATURE_CACHE_GB = 4.0  # the largest feature cache kept when a stage does not say
TOWER_LR_SCALE = 0.1  # a tower learning in a vlm stage, at this share of the stage's rate by default


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def slow_tower(stage: Stage) -> None:
    """A tower that learns through the LLM gets `TOWER_LR_SCALE` of the stage's rate unless the stage
    names one (`lr_vision`); said before training. At the LLM's own rate its features move while the
    projector and the LLM learn to read them (docs/own-images.md)."""
    stage.lr_vision = stage.lr * TOWER_LR_SCALE
    print(
        f"stage {stage.name!r}: the vision tower learns at lr_vision {stage.lr_vision:.1e} "
        f"({TOWER_LR_SCALE} x lr; set lr_vision to choose): at the LLM's own rate a tower's features drift",
        flush=True,
    )


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


class ConversationBatcher:
    """The `vlm` objective's host part: padded (or packed) ids, the answer positions and ids, and the
    pixels the tower must see, as CPU tensors.

    Without the feature cache, every image's pixels, one tensor (`pixel_values`). With it, `image_keys`
    lists every image in order and `new_images` holds the pixels of those this batcher has not sent
    before from this process, one tensor each: the objective caches their features when it runs the
    batch. Each process builds its batches in step order and the training process runs them in step
    order, so an image a batcher skips was sent in a batch that ran before, and its features are cached
    by then. Sending an image again is harmless: a worker sends what another worker sent first, and the
    objective keeps the first features (the same: each image's pixels are computed alone).
    """

    def __init__(
        self,
        data: ConversationData,
        pad_id: int,
        image_token_id: int,
        image_tokens: int,
        pixels: Callable[[list[Image.Image]], torch.Tensor],
        cache: bool,
        row_length: int | None = None,
    ) -> None:
        self.data, self.pad_id, self.pixels, self.cache = data, pad_id, pixels, cache
        self.image_token_id, self.image_tokens = image_token_id, image_tokens
        self.row_length = row_length  # packed rows' token budget (`options.pack`), else one record per row
        self._sent: set[str] = set()  # images whose pixels this process's batcher has sent (the cache)
        self._pid = os.getpid()

    def __call__(self, indices: list[int]) -> dict[str, Any]:
        samples = [self.data[i] for i in indices]
        if self.row_length is None:
            out = collate(samples, self.pad_id)
        else:
            out = collate_packed(samples, self.pad_id, self.row_length)
        paths = [str(p) for p in out.pop("images")]
        check_image_tokens(out["input_ids"] == self.image_token_id, len(paths), self.image_tokens)
        out["answer_positions"], out["answer_ids"] = answer_targets(out.pop("labels"))
        # Rows are right-padded (or packed, with position ids): under the causal mask no real token sees
        # a pad, so the step needs no attention mask (transformers would read it back to see whether it
        # can skip it: a GPU stall).
        out["attention_mask"] = None
        if self.cache and paths:
            if self._pid != os.getpid():  # a copy in a DataLoader worker: it has sent nothing yet
                self._sent, self._pid = set(), os.getpid()
            new = [p for p in dict.fromkeys(paths) if p not in self._sent]
            self._sent.update(new)
            out |= {"image_keys": paths, "new_images": {p: self.pixels([load_image(p)]) for p in new}}
        elif paths:
            out["pixel_values"] = self.pixels([load_image(p) for p in paths])
        return out


class VLMObjective(nn.Module):
    """Summed next-token cross-entropy over the answer tokens of a stage's conversations."""

    def __init__(self, stage: Stage, model: VLM, ctx: StageContext):
        super().__init__()
        if "lora" in stage.train and not isinstance(model.llm, PeftModel):
            add_lora(model, stage)
        self.model = model
        self.device = torch.device(ctx.device)
        self.data = ConversationData(
            stage.data, model.tokenizer, model.image_tokens, stage.max_length, stage.on_bad_record
        )
        self._lengths = tuple(len(s.input_ids) for s in self.data.samples)
        if stage.options.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA adapters and image features even where the layer
            # inputs (frozen embeddings) need none
            model.llm.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        self.frozen = "vision" not in stage.train
        model.vision.train(not self.frozen)
        if not self.frozen and stage.lr_vision is None:
            slow_tower(stage)
        self.cache = self.frozen and (
            stage.options.cache_features
            if stage.options.cache_features is not None
            else self._cache_gb() <= FEATURE_CACHE_GB
        )
        self._features: dict[str, torch.Tensor] = {}  # image path -> (N, D) features on the device
        learning_tower = None if self.frozen else model.vision
        self.drift = ImageDrift(model.llm.get_input_embeddings().weight, learning_tower)
        self._batcher = ConversationBatcher(
            self.data,
            model.tokenizer.pad_token_id,
            model.image_token_id,
            model.image_tokens,
            pixel_fn(model.vision),
            self.cache,
            stage.options.row_length(stage.max_length) if stage.options.pack else None,
        )

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> Sequence[int]:
        return self._lengths

    def _cache_gb(self) -> float:
        """The size of every image's features of this stage, in GB."""
        images = {p for s in self.data.samples for p in s.images}
        tower = self.model.vision
        per_image = tower.num_tokens * tower.hidden_size * next(tower.parameters()).element_size()
        return len(images) * per_image / 1e9

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

    def batcher(self) -> ConversationBatcher:
        return self._batcher

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    @torch.no_grad()
    def _cached_features(self, keys: list[str], new: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B_img, N, D) features of a frozen tower from the cache, computing the new images first.

        One image per forward pass, preprocessed alone: batched CPU kernels differ in the last bits
        with the batch's size, layout and company, so a feature must not depend on which images it
        was first seen with, or a resumed run (whose cache fills in other batches) would not end with
        the same weights."""
        for key, pixels in new.items():
            if key not in self._features:  # a batcher in another worker may send an image again
                self._features[key] = self.model.vision(pixels)[0]
        missing = [k for k in keys if k not in self._features]
        if missing:
            raise RuntimeError(
                f"{missing[0]}: no cached features and no pixels; a batch that first sent this image "
                "was built but never run (build batches only to run them, in order)"
            )
        return torch.stack([self._features[k] for k in keys])

    def count(self, batch: dict[str, Any]) -> int:
        return batch["answer_ids"].numel()  # a size, known on the host

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        batch, features, pixels = dict(batch), None, None
        if "image_keys" in batch:
            features = self._cached_features(batch.pop("image_keys"), batch.pop("new_images"))
        elif "pixel_values" in batch:
            pixels = batch.pop("pixel_values")
            with torch.no_grad() if self.frozen else nullcontext():
                features = self.model.vision(pixels)
        if features is not None:
            batch["image_embeds"] = self.model.project(features)
            self.drift.add(batch["image_embeds"], pixels)
        loss = self.model.answer_loss_sum(**batch, checked=True)  # counted in `batch`
        if features is None and _distributed():
            # A micro-batch of text only leaves the tower and projector out; sharded training (FSDP)
            # reduces the gradients of the same parameters on every process, so they take part with
            # a zero term (a zero gradient: what they contribute to this micro-batch).
            image_side = [*self.model.vision.parameters(), *self.model.projector.parameters()]
            loss = loss + 0.0 * sum(p.sum() for p in image_side if p.requires_grad)
        return loss

    def health(self) -> tuple[dict[str, float], str | None]:
        """The image tokens' mean norm against the LLM's words, how far a learning tower's features
        moved, and a warning when either drifts (`vistune.train.drift`)."""
        return self.drift.read()

    def finish(self) -> None:
        if isinstance(self.model.llm, PeftModel):
            self.model.llm = self.model.llm.merge_and_unload()
        if self.model.llm.is_activation_checkpointing:
            self.model.llm.activation_checkpointing_disable()  # later stages and inference keep activations
