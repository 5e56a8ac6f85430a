"""The `contrastive` stage kind: CLIP/SigLIP image-text pretraining of a tower (`vistune contrastive` runs
it alone: `vistune.commands.contrastive`).

Each micro-batch is `stage.batch_size` (image, caption) pairs per process, scored against the pairs of
every process (`ContrastiveModel.loss` gathers their embeddings as negatives). Batches larger than
`options.chunk_size` are embedded chunk by chunk under activation checkpointing: the forward pass keeps
only each chunk's embeddings, and the backward pass recomputes one chunk at a time (with the same
random state) and pushes the embedding gradients through it. That is gradient caching (Gao et al.,
2021) without a loop of its own: memory grows with the chunk, not the batch, and the gradients equal
the plain full-batch step (BatchNorm layers see chunk statistics).

`train` reads: vision = the vision tower, projector = the two projections and the temperature (and
SigLIP's bias), llm = the text tower (leave it out for LiT, a locked text tower). Locked towers run in
eval mode, and a locked text tower's features are computed once per distinct caption.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vistune.config import Stage
from vistune.data.images import load_image
from vistune.data.readers import caption_of, select_records
from vistune.data.records import Record
from vistune.data.validate import ensure_valid
from vistune.model.contrastive import ContrastiveModel, save_contrastive
from vistune.model.text_tower import build_text_tower
from vistune.model.vlm import VLM
from vistune.train.objective import Batcher, StageContext, move_to, pixel_fn, stage_output


def checked_pairs(
    records: Iterable[tuple[Record, Path]], on_bad: str = "raise"
) -> tuple[list[tuple[Path, str]], int]:
    """(image path, caption) of each (record, image root) that passes validation (images decoded as
    training loads them), and how many were skipped (`on_bad` "skip"; "raise" stops at the first)."""
    cache: dict = {}
    pairs, skipped = [], 0
    for record, root in records:
        if ensure_valid(record, root, on_bad=on_bad, cache=cache):
            pairs.append(pair_of(record, root))
        else:
            skipped += 1
    return pairs, skipped


def pair_of(record: Record, image_root: Path) -> tuple[Path, str]:
    """(image path, caption) of a record, which must hold exactly one image."""
    if len(record.images) != 1:
        raise ValueError(f"{record.where()}: field images: contrastive pairs need exactly one image")
    return image_root / record.images[0], caption_of(record)


def pair_batch(
    pairs: Sequence[tuple[Path, str]], pixels: Callable[[list[Any]], torch.Tensor], indices: list[int]
) -> dict[str, Any]:
    """The contrastive objective's host part: the pairs' pixels (B, 3, H, W) and captions."""
    paths, texts = zip(*(pairs[i] for i in indices), strict=True)
    return {"pixel_values": pixels([load_image(p) for p in paths]), "texts": list(texts)}


class ContrastiveObjective(nn.Module):
    """The model's contrastive loss over image-caption pairs, times the pairs in the micro-batch.

    `holds` is any other module a mid-stage checkpoint must restore (the run's VLM, whose tower this
    trains); `save_to` receives the image-text model when the stage ends.
    """

    def __init__(
        self,
        model: ContrastiveModel,
        pairs: Sequence[tuple[Path, str]],
        stage: Stage,
        device: torch.device,
        holds: nn.Module | None = None,
        save_to: Path | None = None,
        skipped: int = 0,
    ) -> None:
        super().__init__()
        _check_stage(stage, len(pairs))
        self.model, self.pairs, self.device = model, list(pairs), device
        self.chunk = stage.options.chunk_size
        self.holds, self.save_to, self.stage, self.skipped = holds, save_to, stage, skipped
        model.to(device)
        model.vision.train("vision" in stage.train)  # a locked tower runs in eval mode
        model.text.train("llm" in stage.train)
        model.text_cache = None if "llm" in stage.train else {}  # a locked text tower: once per caption
        model.text.max_length = stage.max_length

    def __len__(self) -> int:
        return len(self.pairs)

    def lengths(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "skipped_bad": self.skipped, "loss_function": self.model.loss_name,
                "chunk_size": self.chunk}  # fmt: skip

    def parts(self) -> dict[str, list[nn.Parameter]]:
        m = self.model
        heads = [*m.image_proj.parameters(), *m.text_proj.parameters(), m.logit_scale]
        heads += [m.logit_bias] if m.logit_bias is not None else []
        return {"vision": list(m.vision.parameters()), "projector": heads, "llm": list(m.text.parameters())}

    def batcher(self) -> Batcher:
        return functools.partial(pair_batch, self.pairs, pixel_fn(self.model.vision))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["texts"])

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        img = self._embed(self.model.image_embeddings, batch["pixel_values"])
        txt = self._embed(self.model.text_embeddings, batch["texts"])
        return self.model.loss(img, txt) * len(batch["texts"])

    def _embed(self, embed: Callable[[Any], torch.Tensor], items: Any) -> torch.Tensor:
        """(B, E) embeddings; above `chunk` items, chunk by chunk with activations recomputed in backward."""
        if len(items) <= self.chunk or not torch.is_grad_enabled():
            return embed(items)
        chunks = [items[i : i + self.chunk] for i in range(0, len(items), self.chunk)]
        return torch.cat([checkpoint(embed, c, use_reentrant=False) for c in chunks])

    def health(self) -> tuple[dict[str, float], str | None]:
        return {}, None

    def finish(self) -> None:
        self.model.text_cache = None
        if self.save_to is not None:
            save_contrastive(self.model, self.save_to, extra={"stage": asdict(self.stage)})


def _check_stage(stage: Stage, n_pairs: int) -> None:
    """Reject settings a contrastive stage cannot honour, naming the field."""
    if stage.grad_accum != 1:
        raise ValueError(
            f"stage {stage.name!r}: grad_accum {stage.grad_accum} adds no negatives in contrastive training; "
            "raise batch_size instead (chunking keeps memory flat)"
        )
    if n_pairs < stage.batch_size:
        raise ValueError(
            f"stage {stage.name!r}: {n_pairs} pairs are fewer than one batch of {stage.batch_size}"
        )


def contrastive_stage(stage: Stage, model: VLM, ctx: StageContext) -> ContrastiveObjective:
    """A run's contrastive stage: the VLM's own tower against a text tower; the tower is shared, so what
    it learns carries into the next stages. The image-text model is written to OUT/stages/NAME."""
    pairs, skipped = checked_pairs(
        (
            (r, Path(spec.image_root or Path(spec.path).parent))
            for spec in stage.data
            for r in select_records(spec)
        ),
        stage.on_bad_record,
    )
    options = stage.options
    text = build_text_tower(stage_output(options.text_tower, ctx.run_dir), llm=model.cfg.llm.name_or_path)
    clip = ContrastiveModel(model.vision, text, options.embed_dim, options.loss)
    out = ctx.run_dir / "stages" / stage.name if ctx.is_main else None
    return ContrastiveObjective(clip, pairs, stage, ctx.device, holds=model, save_to=out, skipped=skipped)
