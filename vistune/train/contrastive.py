"""The `contrastive` stage kind and `vistune contrastive`: CLIP/SigLIP image-text pretraining of a tower.

Each micro-batch is `stage.batch_size` (image, caption) pairs per process, scored against the pairs of
every process (`ContrastiveModel.loss` gathers their embeddings as negatives). Batches larger than
`stage.chunk_size` are embedded chunk by chunk under activation checkpointing: the forward pass keeps
only each chunk's embeddings, and the backward pass recomputes one chunk at a time (with the same
random state) and pushes the embedding gradients through it. That is gradient caching (Gao et al.,
2021) without a loop of its own: memory grows with the chunk, not the batch, and the gradients equal
the plain full-batch step (BatchNorm layers see chunk statistics).

`train` reads: vision = the vision tower, projector = the two projections and the temperature (and
SigLIP's bias), llm = the text tower (leave it out for LiT, a locked text tower). Locked towers run in
eval mode, and a locked text tower's features are computed once per distinct caption.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vistune.config import PREPROCESS, VISION_KINDS, Stage, VisionConfig
from vistune.data.images import load_image
from vistune.data.readers import caption_of, load_records, select_records
from vistune.data.records import Record
from vistune.data.validate import ensure_valid
from vistune.model.contrastive import LOSSES, ContrastiveModel, save_contrastive
from vistune.model.text_tower import build_text_tower
from vistune.model.vision import build_vision_tower
from vistune.model.vlm import VLM
from vistune.train.loop import open_run, run_stages
from vistune.train.objective import Batcher, StageContext, move_to, pixel_fn


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
        self.model, self.pairs, self.device, self.chunk = model, list(pairs), device, stage.chunk_size
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

    def batch(self, indices: list[int]) -> dict[str, Any]:
        return self.to_device(self.batcher()(indices))

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
    text = build_text_tower(stage.text_tower, llm=model.cfg.llm.name_or_path)
    clip = ContrastiveModel(model.vision, text, stage.embed_dim, stage.loss)
    out = ctx.run_dir / "stages" / stage.name if ctx.is_main else None
    return ContrastiveObjective(clip, pairs, stage, ctx.device, holds=model, save_to=out, skipped=skipped)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune contrastive", description="Contrastive image-text training.")
    p.add_argument("--pairs", required=True, help="pairs JSONL ({image, caption} per line) or LLaVA captions")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--out", required=True, help="output model directory (also holds checkpoints and logs)")
    p.add_argument("--vision-kind", choices=VISION_KINDS, default="clip")
    p.add_argument("--vision", help="pretrained vision tower: hub id or local directory")
    p.add_argument("--vision-weights", help="safetensors state dict of the vision tower, saved by vistune")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--preprocess", choices=PREPROCESS, default="pad", help="how images are made square")
    p.add_argument("--text", default="minilm", help="minilm | llm | hub id or local directory")
    p.add_argument("--loss", choices=LOSSES, default="clip")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower (LiT)")
    p.add_argument("--lock-vision", action="store_true", help="freeze the vision tower")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step and process")
    p.add_argument("--chunk-size", type=int, default=32, help="pairs embedded at once (activation memory)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-vision", type=float, help="vision tower learning rate (default: --lr)")
    p.add_argument("--limit", type=int, help="use only the first N pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resume", action="store_true", help="continue from the last complete checkpoint in --out"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    return p


def train_contrastive(
    model: ContrastiveModel,
    pairs: Sequence[tuple[Path, str]],
    stage: Stage,
    out: Path,
    seed: int = 0,
    resume: bool = False,
    save_every: int = 200,
    overwrite: bool = False,
) -> float:
    """Train a standalone image-text model on (image path, caption) pairs through the training loop.

    `out` is the run dir (checkpoints, metrics.jsonl, tensorboard/) and receives the model; `resume`
    continues from its newest complete checkpoint. Returns the last finite step's loss."""
    run = open_run(Path(out), seed, save_every=save_every, keep_last=1, resume=resume, overwrite=overwrite)
    save_to = run.dir if run.accelerator.is_main_process else None
    build = lambda s: ContrastiveObjective(model, pairs, s, run.accelerator.device, save_to=save_to)  # noqa: E731
    run_stages([stage], model, build, run, resume=resume)
    run.log.close()
    return run.log.last_loss


def main_train_contrastive(argv: list[str] | None = None) -> int:
    """`vistune contrastive`: train a contrastive image-text model on a pairs file."""
    args = _parser().parse_args(argv)
    records = load_records(args.pairs, args.image_root)
    pairs, _ = checked_pairs((r, records.image_root) for r in records[: args.limit or len(records)])
    train = ["projector"] + ([] if args.lock_vision else ["vision"]) + ([] if args.lock_text else ["llm"])
    stage = Stage(
        name="contrastive", kind="contrastive", train=train, lr=args.lr, lr_vision=args.lr_vision,
        epochs=args.epochs, max_steps=args.steps, batch_size=args.batch_size, warmup_ratio=0.1,
        chunk_size=args.chunk_size, loss=args.loss, embed_dim=args.embed_dim, text_tower=args.text,
    )  # fmt: skip
    vision = VisionConfig(
        kind=args.vision_kind, name_or_path=args.vision, weights=args.vision_weights,
        image_size=args.image_size, preprocess=args.preprocess,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = ContrastiveModel(
        build_vision_tower(vision), build_text_tower(args.text), args.embed_dim, args.loss
    )
    loss = train_contrastive(
        model, pairs, stage, Path(args.out), args.seed, resume=args.resume, overwrite=args.overwrite
    )
    print(f"saved {args.out}: last loss {loss:.4f}")
    return 0
