"""The training loop: one for every stage kind, on `accelerate` (1 CPU, 1 GPU or many processes).

`open_run` sets a run up (accelerator, seeds, log); `run_stages` trains a model through stages in
order, skipping what the newest complete checkpoint already holds; `fit` trains one objective for one
stage: it chooses what learns, builds AdamW with warmup + cosine, lets accelerate wrap the objective
(DDP, FSDP, mixed precision), and steps through the data order of `vistune.train.order`. Each
optimizer step sums the objective's loss over `grad_accum` micro-batches and divides by the loss
targets of the whole effective batch (all micro-batches, all processes). A step reads nothing back to
the host (a stall on a GPU): a non-finite loss or gradient norm makes fused AdamW skip the update on
the device (`found_inf`), and losses, counts and skips are read every `log_every` steps, before each
checkpoint and at the stage's end; skipped steps are counted there and `MAX_BAD_STEPS` in a row stop
the run (the schedule still advances on a skipped step). Micro-batches are built on the host by the
objective's `batcher` (`host_steps`: here, or ahead of time in `stage.workers` DataLoader processes)
and moved to the device by its `to_device` here. Checkpoints every `save_every` steps hold the
objective (model and stage heads) with optimizer, scheduler, RNG and step, so `--resume` continues bit
for bit; the end-of-stage checkpoint holds the model later stages start from, and the random state.
"""

from __future__ import annotations

import gc
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from vistune.config import Stage
from vistune.train import checkpoint as ckpt
from vistune.train.objective import Objective, StageContext
from vistune.train.order import batch_indices, total_steps
from vistune.train.rundir import check_run_dir, clear_run_dir, record_config, resume_sha256
from vistune.train.runlog import RunLog
from vistune.train.trainable import set_trainable

MAX_BAD_STEPS = 3


@dataclass
class Run:
    """What the stages of one run share: where it writes, the distributed engine, the log."""

    dir: Path
    accelerator: Accelerator
    log: RunLog
    seed: int = 0
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    config_sha256: str | None = None  # what a resumed run must keep (`rundir.resume_sha256`)
    recorded_sha256: str | None = None  # the same config as an earlier version recorded it (on resume)

    def context(self) -> StageContext:
        """The StageContext objectives are built with."""
        return StageContext(self.accelerator.device, self.dir, self.accelerator.is_main_process, self.seed)


def make_accelerator(find_unused_parameters: bool = True) -> Accelerator:
    """An Accelerator for this machine: bf16 autocast on GPUs that support it, gloo on CPUs.

    cpu=True is what makes accelerate set up gloo when torchrun starts several CPU processes.
    `find_unused_parameters`: some trainable parameters can get no gradient from the loss of a run's
    stages (their kinds say: `vistune.train.kinds.needs_unused_parameters`); DDP then looks for them
    every step, which costs time, so only runs that need it ask.
    """
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not cuda,
        mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed steps its optimizer inside backward and wants a DataLoader to size its batches; the
        # loop steps explicitly over its own micro-batches, so the two do not fit yet.
        raise ValueError("DeepSpeed is not supported yet: launch with DDP or FSDP (configs/accelerate/)")
    return accelerator


def run_stages(
    stages: Sequence[Stage],
    model: nn.Module,
    build: Callable[[Stage], Objective],
    run: Run,
    resume: bool = False,
) -> None:
    """Train `model` through `stages` in order; with `resume`, continue from the newest complete
    checkpoint: stages it finished are skipped, a stage it is inside continues at the next step."""
    last, info = resumed_from(run) if resume else (None, None)
    if info and info["stage_complete"]:
        ckpt.load_weights(last, model)  # the model as that stage left it; later stages start from here
        ckpt.set_rng_state(info["rng"])  # and the random state it left, so new adapters start the same
    for index, stage in enumerate(stages):
        if info and (index < info["stage"] or (index == info["stage"] and info["stage_complete"])):
            continue
        resume_from = last if info and index == info["stage"] else None
        fit(build(stage), stage, run, index, keep=model, resume_from=resume_from)


def resumed_from(run: Run) -> tuple[Path, dict] | tuple[None, None]:
    """The checkpoint `--resume` continues from (the newest intact one), said on stderr; an error when it
    was written under another config."""
    last, info = ckpt.usable_checkpoint(run.dir)
    if last is None:
        print(f"resume: no usable checkpoint in {run.dir}; training from the first step", file=sys.stderr)
        return None, None
    written = info.get("config_sha256")
    same = (run.config_sha256, run.recorded_sha256)
    if written is not None and run.config_sha256 is not None and written not in same:
        raise ValueError(
            f"{last}: written under a config that differs from this one in a field that may not change on "
            "--resume (its SHA-256); resume with the run's config, or start a new run"
        )
    info.setdefault("stage_complete", False)
    print(f"resume: continuing from checkpoint {last.name}", file=sys.stderr, flush=True)
    return last, info


def open_run(
    run_dir: Path,
    seed: int,
    save_every: int = 200,
    keep_last: int = 2,
    resume: bool = False,
    overwrite: bool = False,
    config: dict | None = None,
    log_every: int = 10,
    find_unused_parameters: bool = True,
) -> Run:
    """A Run writing to `run_dir`: the accelerator, the seeded RNGs and the metrics log.

    A fresh run into a dir holding another run stops unless `overwrite` (which removes that run's
    outputs); `resume` with a `config` that differs from the recorded one stops (see `rundir`).
    `find_unused_parameters` is passed to DDP (`make_accelerator`).
    """
    recorded = check_run_dir(run_dir, config, resume, overwrite)
    accelerator = make_accelerator(find_unused_parameters)
    set_seed(seed)
    if accelerator.is_main_process:
        if overwrite and not resume:
            clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if config is not None:
            record_config(run_dir, config)
    accelerator.wait_for_everyone()
    log = RunLog(run_dir, accelerator.is_main_process)
    fixed = resume_sha256(config) if config is not None else None
    return Run(run_dir, accelerator, log, seed, save_every, keep_last, log_every, fixed, recorded)


def fit(
    objective: Objective,
    stage: Stage,
    run: Run,
    index: int,
    keep: nn.Module,
    resume_from: Path | None = None,
) -> None:
    """Train `objective` for `stage` (the run's stage number `index`) to its end.

    `keep` is the module later stages start from, saved by the end-of-stage checkpoint; `resume_from`
    is a mid-stage checkpoint of this stage to continue from.
    """
    accelerator = run.accelerator
    groups = set_trainable(objective, objective.parts(), stage)
    steps = total_steps(stage, len(objective), accelerator.num_processes)
    # fused: one kernel for all parameters, and it takes `found_inf`, so a bad step is skipped on the device
    optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay, fused=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(stage.warmup_ratio * steps), steps)
    wrapped, prepared = accelerator.prepare(objective, optimizer)
    start = 0
    if resume_from is not None:
        start = ckpt.load_training_state(resume_from, objective, optimizer, scheduler)["step"]
        for group in optimizer.param_groups:  # a checkpoint from before the loop fused AdamW says None
            group["fused"] = True
    run.log.stage(stage, index, steps, objective.describe())
    bar = tqdm(
        range(start, steps), desc=f"stage {index} {stage.name}", disable=not accelerator.is_main_process
    )
    pending: list[StepRecord] = []
    # the rate shown and logged: the stage's own (`lr`), not the tower's, when both learn
    shown = next((i for i, g in enumerate(groups) if not g["vision"]), 0)
    last = time.perf_counter()
    # closing: a run stopped mid-stage (an exception) shuts the DataLoader's workers down at once
    with closing(host_steps(objective, accelerator, stage, run.seed + index, start, steps)) as source:
        for step, host in zip(bar, source, strict=True):
            batches = [objective.to_device(b) for b in host]
            loss, count, finite = train_step(wrapped, objective, prepared, accelerator, stage, batches)
            scheduler.step()
            now = time.perf_counter()
            pending.append(StepRecord(step, loss, count, finite, scheduler.get_last_lr()[shown], now - last))
            last = now
            done = step + 1 == steps
            saving = done or (step + 1) % run.save_every == 0
            if saving or (step + 1) % run.log_every == 0:
                flush(run, stage, pending, bar, objective)
            if done:
                objective.finish()  # e.g. merge LoRA adapters before the end-of-stage checkpoint
                save(run, ckpt.gather_state(keep), index, step + 1, complete=True)
            elif saving:
                save(run, ckpt.gather_state(objective, optimizer, scheduler), index, step + 1, complete=False)
    accelerator.free_memory()
    del wrapped, prepared
    gc.collect()


class StepData(torch.utils.data.Dataset):
    """Item `step`: this process's `grad_accum` host micro-batches of optimizer step `step`.

    A pure function of the step (through `vistune.train.order`), so DataLoader workers build the same
    batches as the training process would, and a loader over steps k.. resumes a stage at step k.
    It holds the objective's `batcher` and the order's inputs, never the model."""

    def __init__(self, objective: Objective, stage: Stage, seed: int, rank: int, world: int) -> None:
        self.batcher, self.n, self.lengths = objective.batcher(), len(objective), objective.lengths()
        self.stage, self.seed, self.rank, self.world = stage, seed, rank, world

    def __getitem__(self, step: int) -> list[dict]:
        return [
            self.batcher(
                batch_indices(self.n, self.seed, step, k, self.rank, self.world, self.stage, self.lengths)
            )
            for k in range(self.stage.grad_accum)
        ]


def host_steps(
    objective: Objective, accelerator: Accelerator, stage: Stage, seed: int, start: int, steps: int
) -> Iterator[list[dict]]:
    """The host micro-batches of steps `start`..`steps - 1`, in order: built here (`stage.workers` 0),
    or ahead of time by `stage.workers` DataLoader worker processes, pinned on CUDA."""
    data = StepData(objective, stage, seed, accelerator.process_index, accelerator.num_processes)
    if stage.workers == 0:
        yield from (data[step] for step in range(start, steps))
        return
    yield from torch.utils.data.DataLoader(
        data,
        batch_size=None,  # an item is already a step's micro-batches
        sampler=range(start, steps),
        num_workers=stage.workers,
        pin_memory=accelerator.device.type == "cuda",
        # its own generator: drawing the workers' seeds from the global one would change what the run
        # draws afterwards (new adapters, dropout), and so what an interrupted run resumes to
        generator=torch.Generator().manual_seed(seed),
    )


def step_batches(
    objective: Objective, accelerator: Accelerator, stage: Stage, seed: int, step: int
) -> list[dict]:
    """This process's `grad_accum` micro-batches of optimizer step `step`, built here, on the device."""
    data = StepData(objective, stage, seed, accelerator.process_index, accelerator.num_processes)
    return [objective.to_device(batch) for batch in data[step]]


def train_step(
    wrapped: nn.Module,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    stage: Stage,
    batches: list[dict],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over the micro-batches of `step_batches`; the loss is normalised by the number
    of loss targets in the whole effective batch (all micro-batches, all processes).

    Returns the step's mean loss, its loss-target count and whether it was finite (and so applied),
    as device tensors: nothing is read back to the host here."""
    world, device = accelerator.num_processes, accelerator.device
    # Counts are known on the host; `full` makes the tensor with a kernel, not a blocking copy.
    local = torch.full((), float(sum(objective.count(b) for b in batches)), device=device)
    total = accelerator.reduce(local, "sum").clamp(min=1.0)
    loss_sum = torch.zeros((), device=device)
    for k, batch in enumerate(batches):
        sync = k == len(batches) - 1
        with nullcontext() if sync else accelerator.no_sync(wrapped):
            loss = wrapped(batch)
            # DDP averages gradients over processes, so scale by `world` to get the global-target mean.
            accelerator.backward(loss * world / total)
        loss_sum += loss.detach()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.as_tensor(accelerator.clip_grad_norm_(params, stage.max_grad_norm), device=device)
    global_loss = accelerator.reduce(loss_sum, "sum")
    finite = torch.isfinite(global_loss) & torch.isfinite(norm)
    fused = optimizer.optimizer if isinstance(optimizer, AcceleratedOptimizer) else optimizer
    fused.found_inf = (~finite).float()  # fused AdamW leaves everything as it was where this is 1
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return global_loss / total, total, finite


@dataclass
class StepRecord:
    """One optimizer step as `fit` keeps it until the next read-back: device tensors and host values."""

    step: int
    loss: torch.Tensor
    count: torch.Tensor
    finite: torch.Tensor
    lr: float
    seconds: float


def flush(run: Run, stage: Stage, pending: list[StepRecord], bar: tqdm, objective: Objective) -> None:
    """Read the pending steps back in one transfer and log them, with the objective's health figures
    on the last; `MAX_BAD_STEPS` non-finite steps in a row stop the run, naming the last of them."""
    if not pending:
        return
    values = torch.stack([torch.stack([r.loss.float(), r.count.float(), r.finite.float()]) for r in pending])
    figures, warning = objective.health()
    if warning and run.accelerator.is_main_process:
        tqdm.write(f"stage {stage.name!r}: warning: {warning}")
    for i, (record, (loss, count, finite)) in enumerate(zip(pending, values.tolist(), strict=True)):
        extra = figures if i == len(pending) - 1 else {}
        run.log.step(record.step, loss, int(count), record.lr, bool(finite), bar, record.seconds, extra)
        if run.log.bad_in_row >= MAX_BAD_STEPS:
            raise RuntimeError(
                f"stage {stage.name!r}: loss or gradients not finite for {run.log.bad_in_row} steps in a row "
                f"(last at step {record.step}); lower the learning rate or check the data"
            )
    pending.clear()


def save(run: Run, state: ckpt.TrainingState, index: int, step: int, complete: bool) -> None:
    """Write a checkpoint from the main process once every process has gathered its state."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        info = {"stage": index, "step": step, "stage_complete": complete, "seed": run.seed}
        if run.config_sha256 is not None:
            info["config_sha256"] = run.config_sha256
        ckpt.save_checkpoint(run.dir, f"stage{index}-step{step:08d}", state, info, run.keep_last)
    accelerator.wait_for_everyone()
