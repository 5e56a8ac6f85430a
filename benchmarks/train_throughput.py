"""Training throughput of the quickstart model, stage by stage: samples/s, tokens/s, FLOP/s, MFU, memory.

MFU is model FLOP/s over the fp32 matmul peak measured here, on this machine, in the same run.
FLOPs per token follow the usual accounting: 2 x params forward; backward 2 x params for activation
gradients plus 2 x trainable params for weight gradients. The vision tower counts per patch token; the
LLM's output layer counts only where the loss is computed (vistune computes logits only there).

    python benchmarks/train_throughput.py --data DIR [--steps 5] [--batch-size 16] [--pack]
    python benchmarks/train_throughput.py --data DIR --baseline [--steps 50] [--batch-size 16] [--pack]

DIR is a shapes world (`vistune data synth --out DIR --train 400 --val 0 --test 0 --compositional 0`).

`--baseline` compares vistune's loop with a plain transformers one. The quickstart's ResNet tower and
object_words projector have no LLaVA form, so both sides train a quickstart-sized model that has one: a
from-scratch CLIP tower (64 px, 8 px patches: 64 image tokens), the `mlp2x_gelu` projector and
SmolLM2-135M-Instruct, as LLaVA's stage 2 (projector and LLM learn, tower frozen) on the quickstart's
instruct data (max_length 192 cuts nothing). vistune runs `open_run` + `fit` (feature cache, logits
only at answer tokens); the baseline is `LlavaForConditionalGeneration` from the same initial weights
(`to_hf_llava`), pad-to-longest batches with the tower run on every image, logits everywhere, HF's
loss, AdamW (same groups), cosine schedule and clipping, on the same records in vistune's order.
Timing leaves out step 0 of each side (warm-up) and counts every later step in full: batch building
and, for vistune, the tower pass of each image seen for the first time (with 50 steps on a large world
most images are new, so the cache saves little here). The first 50 losses must agree within LOSS_RTOL
(relative); they differ at all only through float summation order (one-image vs batched tower passes,
logits on some vs all rows, fused vs plain AdamW, the order of the grad-norm sum). Under bf16
autocast (CUDA) the tolerance is BF16_RTOL.

`--pack` packs vistune's vlm micro-batches (`options: {pack: true}`: several records per row, rows of
`max_length` tokens); both modes print the padding share of the batches (padded tokens over all tokens
in them).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import tempfile
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration, get_cosine_schedule_with_warmup

from vistune.config import ModelConfig, ProjectorConfig, Stage, VisionConfig, load_config
from vistune.data.images import load_image
from vistune.interop.llava import to_hf_llava
from vistune.model.vlm import VLM, build_vlm
from vistune.shapes.quickstart import RECIPE
from vistune.train.conversations import collate, collate_packed
from vistune.train.kinds import build_objective
from vistune.train.loop import fit, open_run
from vistune.train.objective import StageContext, build_batch
from vistune.train.order import batch_indices
from vistune.train.trainable import set_trainable
from vistune.train.vlm import VLMObjective

LOSS_RTOL = 1e-4  # fp32 (CPU): measured 2e-6 over 50 steps of batch 16 (see the module docstring)
BF16_RTOL = 3e-2  # bf16 autocast (CUDA): an estimate, not yet measured
COMPARED = 50  # the first this many losses are compared
Steps = list[tuple[float, float]]  # (loss, seconds) of each step


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def stage_flops(model, stage, batch: dict, labelled: int, tokens: int) -> float:
    """Model FLOPs of one step on `batch` (`tokens` real tokens, `labelled` loss targets) for this stage's
    trainable set."""
    vision_params = sum(p.numel() for p in model.vision.parameters())
    vision_tokens = model.vision.num_tokens
    if stage.kind == "scene":
        images = batch["pixel_values"].shape[0]
        return 6 * vision_params * vision_tokens * images
    llm = model.llm
    embed = llm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - embed  # tied head: the embedding matrix once
    trainable = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    per_token = 2 * body + 2 * body + 2 * trainable  # forward, activation grads, weight grads
    head = 6 * embed * labelled
    # the tower runs on every image, or with the feature cache only on those it has not seen yet
    images = len(batch["new_images"]) if "new_images" in batch else len(batch.get("pixel_values", ()))
    vision = 2 * vision_params * vision_tokens * images
    return per_token * tokens + head + vision


def bench_stage(model, stage, steps: int) -> dict:
    task = build_objective(stage, model, StageContext(torch.device("cpu"), Path("/tmp/vistune-bench")))
    optimizer = torch.optim.AdamW(set_trainable(task, task.parts(), stage), lr=stage.lr)
    size = stage.batch_size
    times, flops, samples, tokens, slots = [], 0.0, 0, 0, 0
    for step in range(steps + 1):  # step 0 warms up (and fills the feature cache): not timed
        indices = [(step * size + k) % len(task) for k in range(size)]
        batch = build_batch(task, indices)
        lengths = task.lengths()  # per record (vlm stages); batches carry no attention mask
        real = sum(lengths[i] for i in indices) if lengths else 0
        start = time.perf_counter()
        loss = task(batch) / max(task.count(batch), 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
            flops += stage_flops(model, stage, batch, task.count(batch), real)
            samples += size
            tokens += real
            slots += batch["input_ids"].numel() if lengths else 0  # token positions, padding included
    task.finish()
    seconds = sum(times)
    padding = 1 - tokens / slots if slots else 0.0
    return {"samples/s": samples / seconds, "tokens/s": tokens / seconds, "FLOP/s": flops / seconds,
            "padding": padding}  # fmt: skip


def baseline_setup(data: str, batch_size: int, steps: int, pack: bool) -> tuple[ModelConfig, Stage]:
    """The LLaVA-exportable quickstart-sized model and its LLaVA stage-2 stage on the instruct data
    (`pack`: vistune packs its micro-batches)."""
    cfg = load_config(RECIPE, [f"data_root={data}", "out=/tmp/vistune-bench"])
    tower = VisionConfig(kind="clip", image_size=64, patch_size=8)
    model = replace(cfg.model, vision=tower, projector=ProjectorConfig(name="mlp2x_gelu"))
    stage = Stage(name="instruct", data=cfg.stages[-1].data, train=["projector", "llm"], lr=2e-5,
                  warmup_ratio=0.0, max_steps=steps, batch_size=batch_size, max_length=192,
                  options={"pack": pack})  # fmt: skip
    return model, stage


def run_vistune(
    model: VLM, stage: Stage, seed: int, run_dir: Path, timed_from: int = 1
) -> tuple[VLMObjective, Steps, float]:
    """Train with vistune's own loop: the objective, (loss, seconds) per step from metrics.jsonl, and the
    seconds from step `timed_from`'s batch to the stage's end (see `stamp`; `grad_accum` 1)."""
    run = open_run(run_dir, seed, save_every=10**9)
    objective = build_objective(stage, model, run.context())
    stamps = stamp(objective, timed_from)
    fit(objective, stage, run, 0, keep=model)
    run.log.close()
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    rows = sorted((r for r in map(json.loads, lines) if "step" in r), key=lambda r: r["step"])
    steps = [(math.inf if r["loss"] is None else r["loss"], r["seconds"]) for r in rows]
    return objective, steps, stamps[-1] - stamps[timed_from]


def stamp(objective: VLMObjective, sync_at: int = 1) -> list[float]:
    """Clock readings as the loop moves each micro-batch to the device (`to_device`, in the training
    process also when DataLoader workers build the batches) and at `finish` (the end).

    On CUDA the device is synchronised at reading `sync_at` (so the queued work of the warm-up steps
    before it is not timed) and at the end (the loop reads the device back only every few steps), so the
    last reading counts all queued work. With `grad_accum` 1, `stamps[k]` is step k's start."""
    stamps: list[float] = []
    to_device, finish = objective.to_device, objective.finish
    cuda = objective.device.type == "cuda"

    def stamped_to_device(batch: dict) -> dict:
        if cuda and len(stamps) == sync_at:  # the warm-up steps' queued work is not timed
            torch.cuda.synchronize(objective.device)
        stamps.append(time.perf_counter())
        return to_device(batch)

    def stamped_finish() -> None:
        if cuda:
            torch.cuda.synchronize(objective.device)
        stamps.append(time.perf_counter())
        finish()

    # on the instance: the loop calls these
    objective.to_device, objective.finish = stamped_to_device, stamped_finish
    return stamps


def step_indices(objective: VLMObjective, stage: Stage, seed: int) -> list[list[int]]:
    """The records of every step as vistune's loop takes them (stage 0 of one process: seed + 0)."""
    n, lengths = len(objective), objective.lengths()
    return [batch_indices(n, seed, step, 0, 0, 1, stage, lengths) for step in range(stage.max_steps)]


def hf_batch(objective: VLMObjective, indices: list[int], device: torch.device) -> dict[str, torch.Tensor]:
    """Pad-to-longest ids, mask and labels (-100 at padding) and every image's pixels."""
    batch = collate([objective.data[i] for i in indices], objective.model.tokenizer.pad_token_id)
    images = batch.pop("images")
    if images:
        batch["pixel_values"] = objective.model.vision.preprocess([load_image(p) for p in images])
    return {k: v.to(device) for k, v in batch.items()}


def run_baseline(
    hf: LlavaForConditionalGeneration,
    objective: VLMObjective,
    stage: Stage,
    order: list[list[int]],
    bf16: bool,
) -> Steps:
    """A plain step per batch: HF's mean loss, backward, clipping, AdamW, cosine schedule."""
    hf.to(objective.device).train()
    hf.model.vision_tower.eval()  # as vistune runs a frozen tower
    llm = [*hf.model.language_model.parameters(), *hf.lm_head.parameters()]
    parts = {  # vistune's parts, so set_trainable makes the same AdamW groups
        "vision": list(hf.model.vision_tower.parameters()),
        "projector": list(hf.model.multi_modal_projector.parameters()),
        "llm": list(dict.fromkeys(llm)),  # a tied head is the embedding matrix: once
    }
    groups = set_trainable(hf, parts, stage)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=stage.weight_decay)
    warmup = math.ceil(stage.warmup_ratio * len(order))
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, len(order))
    out = []
    for indices in order:
        start = time.perf_counter()
        batch = hf_batch(objective, indices, objective.device)
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = hf(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, stage.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        out.append((loss.item(), time.perf_counter() - start))  # .item() syncs: the timer is honest on CUDA
    return out


def packed_slots(objective: VLMObjective, order: list[list[int]], budget: int) -> int:
    """Token positions (padding included) of vistune's packed rows of `budget` tokens over `order`."""
    samples = objective.data.samples
    return sum(collate_packed([samples[i] for i in ids], 0, budget)["input_ids"].numel() for ids in order)


def report(
    seconds: dict[str, float],
    losses: list[list[float]],
    lengths: Sequence[int],
    order: list[list[int]],
    rtol: float,
    packed: int | None = None,
) -> None:
    """Throughput of each side over steps 1.., the padding, the loss agreement and the ratio; `packed`:
    the token positions of vistune's packed rows (`packed_slots`), when it packs."""
    tokens = [sum(lengths[i] for i in ids) for ids in order]
    padded = [len(ids) * max(lengths[i] for i in ids) for ids in order]
    timed = len(order) - 1
    samples = sum(len(ids) for ids in order[1:])
    print(f"{'':<10}{'samples/s':>10}{'tokens/s':>10}{'s/step':>8}  (steps 1..{timed}; step 0 warms up)")
    rate = {name: samples / s for name, s in seconds.items()}
    for name, s in seconds.items():
        print(f"{name:<10}{rate[name]:>10.2f}{sum(tokens[1:]) / s:>10.0f}{s / timed:>8.2f}")
    print(f"padding: {1 - sum(tokens) / sum(padded):.1%} of the batches' tokens (pad to longest)")
    if packed is not None:
        print(f"padding, vistune packed: {1 - sum(tokens) / packed:.1%} of its rows' tokens")
    pairs = list(zip(*losses, strict=True))
    diff = max(abs(a - b) for a, b in pairs)
    rel = max(abs(a - b) / abs(b) for a, b in pairs)
    verdict = "PASS" if rel <= rtol else "FAIL"
    print(f"losses 0..{len(pairs) - 1}: max |diff| {diff:.1e}, max rel {rel:.1e} (rtol {rtol:g}): {verdict}")
    print(f"baseline ratio: {rate['vistune'] / rate['baseline']:.1f}x")


def main_baseline(args: argparse.Namespace) -> None:
    """vistune's loop against the transformers baseline, from the same weights on the same batches."""
    model_cfg, stage = baseline_setup(args.data, args.batch_size, args.steps, args.pack)
    torch.manual_seed(args.seed)  # the new tower and projector: the same initial weights every run
    model = build_vlm(model_cfg)
    hf = to_hf_llava(model)  # before training: the same initial weights
    for t in [*hf.parameters(), *hf.buffers()]:
        t.data = t.data.clone()  # its own copies: vistune trains the tensors they share in place
    with tempfile.TemporaryDirectory(prefix="vistune-baseline-") as tmp:
        objective, ours, our_seconds = run_vistune(model, stage, args.seed, Path(tmp))
    device = objective.device
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # as vistune's accelerator
    order = step_indices(objective, stage, args.seed)
    theirs = run_baseline(hf, objective, stage, order, bf16)
    print(f"device {device} ({'bf16 autocast' if bf16 else 'fp32'}, {torch.get_num_threads()} threads); "
          f"{len(objective)} records, batch {stage.batch_size}, {len(order)} steps")  # fmt: skip
    if args.verbose:
        for step, ((a, s), (b, t)) in enumerate(zip(ours, theirs, strict=True)):
            print(f"  step {step:>3}  loss {a:.6f} {b:.6f}  seconds {s:.2f} {t:.2f}")
    timed = {"vistune": our_seconds, "baseline": sum(s for _, s in theirs[1:])}
    losses = [[loss for loss, _ in side[:COMPARED]] for side in (ours, theirs)]
    packed = packed_slots(objective, order, stage.options.row_length(stage.max_length)) if args.pack else None
    report(timed, losses, objective.lengths(), order, BF16_RTOL if bf16 else LOSS_RTOL, packed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shapes-world directory")
    parser.add_argument("--steps", type=int, help="default: 5, with --baseline 50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--baseline", action="store_true", help="compare with transformers' LLaVA")
    parser.add_argument("--seed", type=int, default=0, help="--baseline: the run's seed")
    parser.add_argument("--verbose", action="store_true", help="--baseline: print every step's losses")
    parser.add_argument("--pack", action="store_true", help="pack vistune's vlm micro-batches (pack: true)")
    args = parser.parse_args()
    if args.baseline:
        args.steps = args.steps or COMPARED
        if args.steps < 2:
            parser.error("--baseline times steps 1..: give --steps 2 or more")
        return main_baseline(args)
    args.steps = args.steps or 5
    cfg = load_config(RECIPE, [f"data_root={args.data}", "out=/tmp/vistune-bench"])
    peak = matmul_peak()
    print(f"fp32 matmul peak here: {peak / 1e9:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    model = build_vlm(cfg.model)
    heads = (
        ("samples/s", 10),
        ("tokens/s", 10),
        ("GFLOP/s", 9),
        ("MFU", 7),
        ("padding", 9),
        ("peak RSS GB", 13),
    )
    print(f"{'stage':<10}" + "".join(f"{name:>{width}}" for name, width in heads))
    for stage in cfg.stages:
        stage.batch_size = args.batch_size
        if stage.kind == "vlm":
            stage.options.pack = args.pack
        r = bench_stage(model, stage, args.steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(
            f"{stage.name:<10}{r['samples/s']:>10.1f}{r['tokens/s']:>10.0f}{r['FLOP/s'] / 1e9:>9.1f}"
            f"{r['FLOP/s'] / peak:>7.1%}{r['padding']:>9.1%}{rss:>13.2f}"
        )


if __name__ == "__main__":
    main()
