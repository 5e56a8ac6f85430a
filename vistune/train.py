"""`vistune train CONFIG`: run a config's stages in order on `accelerate` (1 CPU, 1 GPU or many processes).

Reads top to bottom: build the model, then for each stage: choose what trains, build its task (data +
loss), and run the loop. The loop is ours and explicit; accelerate supplies devices, DDP/FSDP wrapping,
mixed precision and collective ops. The data order is a pure function of (seed, stage, step), which is
what makes `--resume` exact: a checkpoint stores the step, and the loop picks up at the next batch.
"""

from __future__ import annotations

import functools
import gc
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vistune import checkpoint as ckpt
from vistune.config import Config, Stage, save_config
from vistune.model import VLM, build_vlm, save_vlm
from vistune.runlog import RunLog
from vistune.stages import build_task, set_trainable

MAX_BAD_STEPS = 3
GROUP_WINDOW = 8  # group_by_length sorts windows of this many global batches


def train(cfg: Config, resume: bool = False) -> Path:
    """Run every stage of `cfg`; return the directory of the final model (loadable by chat/eval)."""
    run_dir = Path(cfg.out)
    # cpu=True is what makes accelerate set up gloo when torchrun starts several CPU processes. Some
    # trainable parameters can be unused by a stage's loss (CLIP's pooler in the scene stage): tell DDP.
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision="bf16" if _bf16_ok() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
    model = build_vlm(cfg.model)
    last = ckpt.latest_checkpoint(run_dir) if resume else None
    info = ckpt.read_info(last) if last else None
    log = RunLog(run_dir, accelerator.is_main_process)
    if info and info["stage_complete"]:
        ckpt.load_weights(last, model)  # the model as that stage left it; later stages start from here
    for index, stage in enumerate(cfg.stages):
        if info and (index < info["stage"] or (index == info["stage"] and info["stage_complete"])):
            continue
        resume_from = last if info and index == info["stage"] else None
        if stage.kind == "contrastive":
            run_contrastive_stage(cfg, index, stage, model, accelerator)
        else:
            run_stage(cfg, index, stage, model, accelerator, log, resume_from)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_vlm(model, run_dir / "model")
        log.plot(run_dir / "loss.png")
    log.close()
    return run_dir / "model"


def _bf16_ok() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def run_stage(
    cfg: Config,
    index: int,
    stage: Stage,
    model: VLM,
    accelerator: Accelerator,
    log: RunLog,
    resume_from: Path | None,
) -> None:
    """Train one stage to its end, checkpointing every `cfg.save_every` steps and at the end."""
    groups = set_trainable(model, stage)
    task = build_task(stage, model, accelerator.device)
    if hasattr(task, "parameters_to_train"):  # stage-only heads (e.g. the scene objective's classifiers)
        groups.append({"params": task.parameters_to_train(), "lr": groups[0]["lr"]})
    world = accelerator.num_processes
    steps = total_steps(stage, len(task), world)
    optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(stage.warmup_ratio * steps), steps)
    wrapped, optimizer = accelerator.prepare(task, optimizer)
    start = 0
    if resume_from is not None:
        ckpt.load_weights(resume_from, task)
        start = ckpt.load_training_state(resume_from, optimizer, scheduler)["step"]
    log.stage(stage, index, steps, task.describe())
    bar = tqdm(
        range(start, steps), desc=f"stage {index} {stage.name}", disable=not accelerator.is_main_process
    )
    bad = 0
    for step in bar:
        loss, count, ok = train_step(wrapped, task, optimizer, accelerator, stage, cfg.seed + index, step)
        if ok:
            scheduler.step()
        log.step(step, loss, count, scheduler.get_last_lr()[0], ok, bar)
        bad = 0 if ok else bad + 1
        if bad >= MAX_BAD_STEPS:
            raise RuntimeError(
                f"stage {stage.name!r}: loss or gradients not finite for {bad} steps in a row "
                f"(last at step {step}); lower the learning rate or check the data"
            )
        done = step + 1 == steps
        if done or (step + 1) % cfg.save_every == 0:
            if done:
                task.finish()  # e.g. merge LoRA adapters before the end-of-stage checkpoint
            # Mid-stage checkpoints hold the whole task (model + any stage heads) for exact resume;
            # the end-of-stage one holds the model that the next stage starts from.
            _save(cfg, model if done else task, optimizer, scheduler, accelerator, index, step + 1, done)
    accelerator.free_memory()
    del wrapped
    gc.collect()


def run_contrastive_stage(
    cfg: Config, index: int, stage: Stage, model: VLM, accelerator: Accelerator
) -> None:
    """Pretrain the model's own vision tower against a text tower (CLIP/SigLIP); the tower is shared, so
    what it learns carries into the next stages. The stage runs its own loop (gradient caching) and
    writes its image-text model to OUT/stages/NAME; a checkpoint marks it complete."""
    from vistune.contrastive import ContrastiveModel
    from vistune.dataset import select
    from vistune.text_tower import build_text_tower
    from vistune.train_contrastive import train_contrastive

    roots = {spec.image_root for spec in stage.data}
    if len(roots) != 1:
        raise ValueError(f"stage {stage.name!r}: contrastive data must share one image_root, got {roots}")
    records = [r for spec in stage.data for r in select(spec)]
    clip = ContrastiveModel(model.vision, build_text_tower(stage.text_tower), stage.embed_dim, stage.loss)
    out = Path(cfg.out) / "stages" / stage.name
    train_contrastive(
        clip, records, roots.pop(), stage, accelerator, out, stage.chunk_size, seed=cfg.seed + index
    )
    _save(cfg, model, None, None, accelerator, index, 0, True)


def total_steps(stage: Stage, n: int, world: int) -> int:
    """Optimizer steps: `max_steps`, else enough global batches to cover `epochs` passes over the data."""
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * n / (stage.batch_size * stage.grad_accum * world)))


def batch_indices(
    n: int,
    seed: int,
    step: int,
    micro: int,
    rank: int,
    world: int,
    stage: Stage,
    lengths: tuple[int, ...] | None = None,
) -> list[int]:
    """Dataset indices of one micro-batch: a pure function of its position, so resume is exact.

    The global batch of `step` is `batch_size * grad_accum * world` consecutive positions of an endless
    sequence of per-epoch orders; process `rank` takes its slices of it. With `lengths` and
    `stage.group_by_length`, each epoch's order puts records of similar length in the same global batch.
    """
    size = stage.batch_size
    group = size * stage.grad_accum * world
    start = step * group + (micro * world + rank) * size
    lengths = lengths if stage.group_by_length else None
    orders: dict[int, torch.Tensor] = {}  # a batch spans at most two epochs: look each order up once
    out = []
    for pos in range(start, start + size):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = _epoch_order(n, seed, epoch, lengths, group)
        out.append(int(orders[epoch][offset]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, lengths: tuple[int, ...] | None, group: int) -> torch.Tensor:
    """The order of epoch `epoch` over `n` records: seeded, so every process and every resume agrees.

    With lengths (LLaVA's group-by-length): sort each window of GROUP_WINDOW global batches of the
    shuffled order by length, cut it into global batches and shuffle those, so batches waste little
    padding but the order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if lengths is None or group >= n:
        return order
    keys = torch.tensor(lengths)[order]
    window = group * GROUP_WINDOW
    parts = [
        order[i : i + window][keys[i : i + window].argsort(descending=True, stable=True)]
        for i in range(0, n, window)
    ]
    batches = torch.cat(parts).split(group)
    full = n // group  # a short last batch stays last, so every other batch starts on a batch boundary
    shuffled = [batches[i] for i in torch.randperm(full, generator=generator)]
    return torch.cat(shuffled + list(batches[full:]))


def train_step(
    wrapped: torch.nn.Module,
    task: Any,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    stage: Stage,
    seed: int,
    step: int,
) -> tuple[float, int, bool]:
    """One optimizer step over `grad_accum` micro-batches; the loss is normalised by the number of
    loss targets in the whole effective batch (all micro-batches, all processes)."""
    rank, world = accelerator.process_index, accelerator.num_processes
    batches = [
        task.batch(
            batch_indices(len(task), seed, step, k, rank, world, stage, getattr(task, "lengths", None))
        )
        for k in range(stage.grad_accum)
    ]
    local = torch.tensor(float(sum(task.count(b) for b in batches)), device=accelerator.device)
    total = accelerator.reduce(local, "sum").clamp(min=1.0)
    loss_sum = torch.zeros((), device=accelerator.device)
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(wrapped):
            loss = wrapped(batch)
            # DDP averages gradients over processes, so scale by `world` to get the global-token mean.
            accelerator.backward(loss * world / total)
        loss_sum += loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = accelerator.clip_grad_norm_(params, stage.max_grad_norm)
    global_loss = accelerator.reduce(loss_sum, "sum")
    ok = bool(torch.isfinite(global_loss)) and bool(torch.isfinite(torch.as_tensor(norm)))
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(global_loss / total), int(total), ok


def _save(cfg: Config, module, optimizer, scheduler, accelerator: Accelerator, index, step, complete) -> None:
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        info = {"stage": index, "step": step, "stage_complete": complete, "seed": cfg.seed}
        ckpt.save_checkpoint(
            Path(cfg.out), f"stage{index}-step{step:08d}", module,
            optimizer, scheduler, info, cfg.keep_last,
        )  # fmt: skip
    accelerator.wait_for_everyone()


def main_train(argv: list[str] | None = None) -> int:
    """`vistune train CONFIG [--set key=value ...] [--resume] [--out DIR]`."""
    import argparse

    from vistune.config import load_config

    parser = argparse.ArgumentParser(prog="vistune train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set + ([f"out={args.out}"] if args.out else []))
    model_dir = train(cfg, resume=args.resume)
    print(json.dumps({"model": str(model_dir)}))
    return 0
