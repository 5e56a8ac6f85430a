"""`vistune contrastive`: train a standalone image-text model (CLIP/SigLIP) on a pairs file.

The stage kind it runs is `vistune.train.contrastive`; this module sets up the run (`open_run`), the
towers from the flags, and hands one `contrastive` stage to the training loop.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from vistune.config import PREPROCESS, VISION_KINDS, ContrastiveOptions, Stage, VisionConfig
from vistune.data.readers import load_records
from vistune.model.contrastive import LOSSES, ContrastiveModel
from vistune.model.text_tower import build_text_tower
from vistune.model.vision import build_vision_tower
from vistune.train.contrastive import ContrastiveObjective, checked_pairs
from vistune.train.kinds import needs_unused_parameters
from vistune.train.loop import open_run, run_stages


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
    run = open_run(
        Path(out), seed, save_every=save_every, keep_last=1, resume=resume, overwrite=overwrite,
        find_unused_parameters=needs_unused_parameters([stage]),
    )  # fmt: skip
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
        options=ContrastiveOptions(args.text, args.loss, args.embed_dim, args.chunk_size),
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
