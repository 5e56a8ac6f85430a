"""Contrastive training stage: image-caption pairs -> a ContrastiveModel, on accelerate.

One optimizer step sees `stage.batch_size` pairs per process. Batches larger than `chunk_size` use
gradient caching (Gao et al., 2021): embed every chunk without autograd, take the loss and its gradient
on the full batch of embeddings, then re-run each chunk with autograd and push the cached embedding
gradients through it. Memory then grows with the chunk, not the batch, and the gradients equal the plain
full-batch step (random state such as dropout is replayed; BatchNorm layers see chunk statistics).

With several processes every process scores its rows against all gathered embeddings; parameter
gradients are averaged across processes by an explicit all-reduce (the model is not DDP-wrapped, since
gradient caching runs several forwards per step).

Stage fields used: lr, lr_vision, weight_decay, warmup_ratio, epochs / max_steps, batch_size,
max_grad_norm, max_length, and `train` read as: vision = vision tower, projector = projections and
temperature, llm = the text tower (leave it out for LiT, a locked text tower). Locked towers run in eval
mode, and a locked text tower's features are computed once per distinct caption and kept in memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vistune.config import VISION_KINDS, Stage, VisionConfig
from vistune.contrastive import LOSSES, ContrastiveModel, save_contrastive
from vistune.data.records import Record

DEFAULT_CHUNK = 32


def caption_of(record: Record) -> str:
    """The caption of a pairs record (meta caption), else its last assistant turn."""
    if isinstance(record.meta.get("caption"), str):
        return record.meta["caption"]
    answers = [t.content for t in record.turns if t.role == "assistant"]
    if not answers:
        raise ValueError(f"{record.where()}: field caption: no caption and no assistant turn")
    return answers[-1]


class PairData(torch.utils.data.Dataset):
    """(pixels (3, H, W), caption) per record; each record must have exactly one image."""

    def __init__(self, records: Sequence[Record], image_root: str | Path, preprocess: Any) -> None:
        self.records, self.image_root, self.preprocess = records, Path(image_root), preprocess

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        from vistune.data.images import load_image

        record = self.records[index]
        if len(record.images) != 1:
            raise ValueError(f"{record.where()}: field images: contrastive pairs need exactly one image")
        image = load_image(self.image_root / record.images[0])
        return self.preprocess([image])[0], caption_of(record)


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([p for p, _ in items]), [t for _, t in items]


def set_trainable(model: ContrastiveModel, train: Sequence[str]) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze the parts `train` names; return the trainable parameters."""
    parts = {"vision": [model.vision], "llm": [model.text], "projector": [model.image_proj, model.text_proj]}
    model.requires_grad_(False)
    for name in train:
        if name not in parts:
            raise ValueError(f"contrastive stage: train {name!r} is not one of {sorted(parts)}")
        for module in parts[name]:
            module.requires_grad_(True)
    for name, module in (("vision", model.vision), ("llm", model.text)):
        module.train(name in train)  # a locked tower runs in eval mode: no dropout, fixed BatchNorm
    if "projector" in train:  # the temperature (and SigLIP bias) learn with the heads
        model.logit_scale.requires_grad_(True)
        if model.logit_bias is not None:
            model.logit_bias.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


@contextlib.contextmanager
def _replay(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> Iterator[None]:
    """Run a block with a saved RNG state (so dropout masks repeat), restoring the current one after."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if state[1] is not None else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])
        yield


def plain_step(model: ContrastiveModel, pixels: torch.Tensor, texts: list[str], backward: Any) -> float:
    """Forward the whole batch with autograd and backpropagate the loss; return the loss."""
    loss = model.loss(model.image_embeddings(pixels), model.text_embeddings(texts))
    backward(loss)
    return float(loss.detach())


def grad_cache_step(
    model: ContrastiveModel, pixels: torch.Tensor, texts: list[str], chunk: int, backward: Any
) -> float:
    """Gradient-cached step: same parameter gradients as `plain_step`, memory of one chunk."""
    pix_chunks = pixels.split(chunk)
    txt_chunks = [texts[i : i + chunk] for i in range(0, len(texts), chunk)]
    states: list[Any] = []
    img_parts, txt_parts = [], []
    with torch.no_grad():  # pass 1: embeddings only, remembering each chunk's RNG state
        for pix in pix_chunks:
            states.append(_rng_state())
            img_parts.append(model.image_embeddings(pix))
        for txt in txt_chunks:
            states.append(_rng_state())
            txt_parts.append(model.text_embeddings(txt))
    img = torch.cat(img_parts).requires_grad_(True)  # (B, E) leaves that collect d loss / d embedding
    txt = torch.cat(txt_parts).requires_grad_(True)
    loss = model.loss(img, txt)
    backward(loss)  # grads reach img/txt and the temperature directly
    grads = list(img.grad.split(chunk)) + list(txt.grad.split(chunk))
    inputs = [(model.image_embeddings, p) for p in pix_chunks] + [
        (model.text_embeddings, t) for t in txt_chunks
    ]
    for (embed, x), state, grad in zip(inputs, states, grads, strict=True):  # pass 2: chunk by chunk
        with _replay(state):
            emb = embed(x)
        if emb.requires_grad:  # a locked tower gives embeddings without a graph
            emb.backward(grad)
    return float(loss.detach())


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Average gradients over processes (what DDP would do), in one flat buffer."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _optimizer(model: ContrastiveModel, stage: Stage) -> torch.optim.AdamW:
    """AdamW with the vision tower at lr_vision; weight decay on matrices only (not norms, biases, temps)."""
    vision_ids = {id(p) for p in model.vision.parameters()}
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            lr = (stage.lr_vision or stage.lr) if id(p) in vision_ids else stage.lr
            groups.setdefault((lr, stage.weight_decay if p.dim() >= 2 else 0.0), []).append(p)
    if not groups:
        raise ValueError(f"stage {stage.name!r}: nothing to train; train={stage.train}")
    return torch.optim.AdamW(
        [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    )


def _batches(loader: Any, steps: int) -> Iterator[tuple[int, tuple[torch.Tensor, list[str]]]]:
    """Yield (step, batch) for `steps` optimizer steps, cycling the loader across epochs."""
    step, epoch = 0, 0
    while step < steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        for batch in loader:
            if step >= steps:
                return
            yield step, batch
            step += 1
        epoch += 1


def train_contrastive(
    model: ContrastiveModel,
    records: Sequence[Record],
    image_root: str | Path,
    stage: Stage,
    accelerator: Any = None,
    out_dir: str | Path = "runs/contrastive",
    chunk_size: int = DEFAULT_CHUNK,
    log_every: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Train `model` on image-caption `records` for one contrastive stage; save it into `out_dir`.

    Args:
        model: the ContrastiveModel (moved to the accelerator's device).
        records: pairs; each needs one image and a caption (meta caption or an assistant turn).
        image_root: folder the records' image paths are relative to.
        stage: the stage (kind contrastive); see the module docstring for the fields used.
        accelerator: an `accelerate.Accelerator`; created if None.
        out_dir: receives model.safetensors, vistune.json, tokenizer/ and metrics.jsonl.
        chunk_size: batches larger than this per process use gradient caching.
        log_every: steps between progress-bar updates (every step is written to metrics.jsonl).
        seed: seeds shuffling and initial RNG.
    Returns the last step's metrics.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = accelerator or Accelerator()
    _check_stage(stage, len(records), accelerator.num_processes)
    set_seed(seed)
    out = Path(out_dir)
    model.to(accelerator.device).train()
    params = set_trainable(model, stage.train)
    # A locked text tower in eval mode maps each caption to a fixed vector: compute it once.
    model.text_cache = None if "llm" in stage.train else {}
    model.text.max_length = stage.max_length
    loader, optimizer, scheduler, steps = _setup(model, records, image_root, stage, accelerator)
    log = _MetricLog(out / "metrics.jsonl", accelerator.is_main_process)
    bar = tqdm(total=steps, desc=f"contrastive {stage.name}", disable=not accelerator.is_main_process)
    row: dict[str, Any] = {}
    last = time.perf_counter()
    for step, (pixels, texts) in _batches(loader, steps):
        loss = _train_step(model, pixels, texts, chunk_size, accelerator, params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        now, n = time.perf_counter(), len(texts) * accelerator.num_processes
        row = {
            "stage": stage.name,
            "step": step + 1,
            "loss": loss,
            "lr": scheduler.get_last_lr()[0],
            "scale": model.scale().item(),
            "samples_per_s": n / (now - last),  # wall time between steps, data loading included
        }
        last = now
        log.write(row)
        bar.update(1)
        if step % log_every == 0 or step + 1 == steps:
            bar.set_postfix(loss=f"{loss:.4f}", scale=f"{row['scale']:.1f}")
    bar.close()
    model.text_cache = None
    if accelerator.is_main_process:
        save_contrastive(model, out, extra={"stage": asdict(stage), "seed": seed})
    accelerator.wait_for_everyone()
    return row


def _setup(
    model: ContrastiveModel, records: Sequence[Record], image_root: str | Path, stage: Stage, accelerator: Any
) -> tuple[Any, torch.optim.Optimizer, Any, int]:
    """Sharded shuffling loader, AdamW, warmup + cosine schedule, and the number of optimizer steps."""
    from transformers import get_cosine_schedule_with_warmup

    data = PairData(records, image_root, model.vision.preprocess)
    loader = torch.utils.data.DataLoader(
        data, batch_size=stage.batch_size, shuffle=True, drop_last=True, collate_fn=_collate
    )
    loader = accelerator.prepare(loader)  # drop_last: gathered losses need equal local batches
    optimizer = _optimizer(model, stage)
    steps = stage.max_steps or max(1, math.floor(stage.epochs * len(loader)))
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(stage.warmup_ratio * steps), steps)
    return loader, optimizer, scheduler, steps


def _train_step(
    model: ContrastiveModel,
    pixels: torch.Tensor,
    texts: list[str],
    chunk_size: int,
    accelerator: Any,
    params: list[nn.Parameter],
    max_grad_norm: float,
) -> float:
    """Gradients of one batch (cached when larger than chunk_size), averaged over processes, clipped."""
    with accelerator.autocast():
        if len(texts) > chunk_size:
            loss = grad_cache_step(model, pixels, texts, chunk_size, accelerator.backward)
        else:
            loss = plain_step(model, pixels, texts, accelerator.backward)
    if accelerator.num_processes > 1:
        _all_reduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return loss


def _check_stage(stage: Stage, n_records: int, processes: int) -> None:
    """Reject settings this stage cannot honour, naming the field."""
    if stage.kind != "contrastive":
        raise ValueError(f"stage {stage.name!r}: kind is {stage.kind!r}, expected 'contrastive'")
    if stage.grad_accum != 1:
        raise ValueError(
            f"stage {stage.name!r}: grad_accum {stage.grad_accum} adds no negatives in contrastive training; "
            "raise batch_size instead (gradient caching keeps memory flat)"
        )
    if n_records < stage.batch_size * processes:
        raise ValueError(
            f"stage {stage.name!r}: {n_records} pairs are fewer than one batch of {stage.batch_size}"
        )


class _MetricLog:
    """Appends one JSON line per step (main process only)."""

    def __init__(self, path: Path, active: bool) -> None:
        self.path, self.active = path, active
        if active:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("", encoding="utf-8")

    def write(self, row: dict[str, Any]) -> None:
        if self.active:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune contrastive", description="Contrastive image-text training.")
    p.add_argument("--pairs", required=True, help="pairs JSONL ({image, caption} per line) or LLaVA captions")
    p.add_argument("--image-root", help="folder image paths are relative to (default: the file's folder)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--vision-kind", choices=VISION_KINDS, default="clip")
    p.add_argument("--vision", help="pretrained vision tower: hub id or local directory")
    p.add_argument("--vision-weights", help="safetensors state dict of the vision tower, saved by vistune")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--text", default="minilm", help="minilm | llm | hub id or local directory")
    p.add_argument("--loss", choices=LOSSES, default="clip")
    p.add_argument("--embed-dim", type=int, default=128)
    p.add_argument("--lock-text", action="store_true", help="freeze the text tower (LiT)")
    p.add_argument("--lock-vision", action="store_true", help="freeze the vision tower")
    p.add_argument("--steps", type=int, help="optimizer steps (default: one epoch)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=64, help="pairs per step and process")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK, help="gradient-caching chunk")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-vision", type=float, help="vision tower learning rate (default: --lr)")
    p.add_argument("--limit", type=int, help="use only the first N pairs")
    p.add_argument("--seed", type=int, default=0)
    return p


def main_train_contrastive(argv: list[str] | None = None) -> int:
    """`vistune contrastive`: train a contrastive image-text model on a pairs file."""
    from vistune.data.llava import load_records
    from vistune.text_tower import build_text_tower
    from vistune.vision import build_vision_tower

    args = _parser().parse_args(argv)
    torch.manual_seed(args.seed)
    records = load_records(args.pairs, args.image_root)
    records = records[: args.limit] if args.limit else records
    vcfg = VisionConfig(
        kind=args.vision_kind,
        name_or_path=args.vision,
        weights=args.vision_weights,
        image_size=args.image_size,
    )
    train = ["projector"] + ([] if args.lock_vision else ["vision"]) + ([] if args.lock_text else ["llm"])
    stage = Stage(
        name="contrastive",
        kind="contrastive",
        train=train,
        lr=args.lr,
        lr_vision=args.lr_vision,
        epochs=args.epochs,
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_ratio=0.1,
    )
    model = ContrastiveModel(build_vision_tower(vcfg), build_text_tower(args.text), args.embed_dim, args.loss)
    root = args.image_root or Path(args.pairs).parent
    row = train_contrastive(
        model, records, root, stage, out_dir=args.out, chunk_size=args.chunk_size, seed=args.seed
    )
    print(f"saved {args.out}: last step {row.get('step')}, loss {row.get('loss', float('nan')):.4f}")
    return 0
