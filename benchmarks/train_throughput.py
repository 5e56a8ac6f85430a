"""Training throughput of the quickstart model, stage by stage: samples/s, tokens/s, FLOP/s, MFU, memory.

MFU is model FLOP/s over the fp32 matmul peak measured here, on this machine, in the same run.
FLOPs per token follow the usual accounting: 2 x params forward; backward 2 x params for activation
gradients plus 2 x trainable params for weight gradients. The vision tower counts per patch token; the
LLM's output layer counts only where the loss is computed (vistune computes logits only there).

    python benchmarks/train_throughput.py --data DIR [--steps 5] [--batch-size 16]

DIR is a shapes world (`vistune data synth --out DIR --train 400 --val 0 --test 0 --compositional 0`).
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

from vistune.config import load_config
from vistune.model.template import IGNORE
from vistune.model.vlm import build_vlm
from vistune.shapes.quickstart import RECIPE
from vistune.train.kinds import build_objective
from vistune.train.objective import StageContext
from vistune.train.trainable import set_trainable


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
    """Measured fp32 matmul FLOP/s (best of `repeats`)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def stage_flops(model, stage, batch: dict) -> float:
    """Model FLOPs of one step on `batch` for this stage's trainable set."""
    vision_params = sum(p.numel() for p in model.vision.parameters())
    vision_tokens = model.vision.num_tokens
    if stage.kind == "scene":
        images = batch["pixel_values"].shape[0]
        return 6 * vision_params * vision_tokens * images
    llm = model.llm
    embed = llm.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - embed  # tied head: the embedding matrix once
    trainable = sum(p.numel() for p in llm.parameters() if p.requires_grad)
    tokens = int(batch["attention_mask"].sum())
    labelled = int((batch["labels"][:, 1:] != IGNORE).sum())
    per_token = 2 * body + 2 * body + 2 * trainable  # forward, activation grads, weight grads
    head = 6 * embed * labelled
    cached = "vision_features" in batch
    images = (batch.get("vision_features") if cached else batch.get("pixel_values")).shape[0]
    vision = 0 if cached else 2 * vision_params * vision_tokens * images
    return per_token * tokens + head + vision


def bench_stage(model, stage, steps: int) -> dict:
    task = build_objective(stage, model, StageContext(torch.device("cpu"), Path("/tmp/vistune-bench")))
    optimizer = torch.optim.AdamW(set_trainable(task, task.parts(), stage), lr=stage.lr)
    size = stage.batch_size
    times, flops, samples, tokens = [], 0.0, 0, 0
    for step in range(steps + 1):  # step 0 warms up (and fills the feature cache): not timed
        batch = task.batch([(step * size + k) % len(task) for k in range(size)])
        start = time.perf_counter()
        loss = task(batch) / max(task.count(batch), 1)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - start)
            flops += stage_flops(model, stage, batch)
            samples += size
            tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    task.finish()
    seconds = sum(times)
    return {"samples/s": samples / seconds, "tokens/s": tokens / seconds, "FLOP/s": flops / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shapes-world directory")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    cfg = load_config(RECIPE, [f"data_root={args.data}", "out=/tmp/vistune-bench"])
    peak = matmul_peak()
    print(f"fp32 matmul peak here: {peak / 1e9:.1f} GFLOP/s, threads {torch.get_num_threads()}")
    model = build_vlm(cfg.model)
    print(f"{'stage':<10}{'samples/s':>10}{'tokens/s':>10}{'GFLOP/s':>9}{'MFU':>7}{'peak RSS GB':>13}")
    for stage in cfg.stages:
        stage.batch_size = args.batch_size
        r = bench_stage(model, stage, args.steps)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
        print(
            f"{stage.name:<10}{r['samples/s']:>10.1f}{r['tokens/s']:>10.0f}{r['FLOP/s'] / 1e9:>9.1f}"
            f"{r['FLOP/s'] / peak:>7.1%}{rss:>13.2f}"
        )


if __name__ == "__main__":
    main()
