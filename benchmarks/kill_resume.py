"""Kill a real training run with SIGKILL at random moments, resume it, and compare the final weights.

    python benchmarks/kill_resume.py [--kills 20] [--seed 0] [--work DIR]

A short run of every stage kind (scene, classify, contrastive, LoRA instruct) on a tiny shapes world
and a tiny Llama built from a config (SmolLM2's tokenizer) is first trained without interruption. Then,
for each trial, the same command starts in a fresh run dir, gets SIGKILL after a random share of the
uninterrupted run's training time (counted from its first logged step, so that start-up does not
swallow the kills), and is resumed with `--resume` until it finishes; its final weights are compared
bit for bit with the uninterrupted run's. Prints k/N identical, and where each kill landed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vistune.shapes.synth import synthesize

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def config(data: Path) -> dict:
    """Four stages of 6 steps, a checkpoint every 2 steps."""
    steps = {"max_steps": 6, "batch_size": 4, "lr": 0.01}
    images = {"image_root": "images"}
    return {
        "data_root": str(data), "seed": 0, "save_every": 2, "keep_last": 2,
        "model": {
            "vision": {"kind": "resnet", "image_size": 32, "resnet_depths": [1, 1], "resnet_widths": [8, 16]},
            "projector": {"name": "mlp2x_gelu"},
            "llm": {"name_or_path": "smollm2", "chat_template": "chatml", "from_config": {
                "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}},
        },
        "stages": [
            {"name": "scene", "kind": "scene", "train": ["vision"],
             "data": [{"path": "scenes/train.jsonl", **images}], **steps},
            {"name": "labels", "kind": "classify", "train": ["vision", "projector"],
             "data": [{"path": "imagefolder/train"}], **steps},
            {"name": "clip", "kind": "contrastive", "train": ["vision", "projector"], "max_length": 32,
             "data": [{"path": "train/pairs.jsonl", **images}], **steps},
            {"name": "instruct", "train": ["lora"], "lora_rank": 4, "max_length": 160,
             "data": [{"path": "train/conversations.json", **images}], **steps},
        ],
    }  # fmt: skip


def train(cfg: Path, out: Path, resume: bool) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vistune.cli", "train", str(cfg), "--out", str(out)] + (
        ["--resume"] * resume
    )
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = load_file(model_dir / "vision_projector.safetensors")
    return out | {f"llm.{k}": v for k, v in load_file(model_dir / "llm" / "model.safetensors").items()}


def where(out: Path) -> str:
    """The newest complete checkpoint the killed run left, as a place in the run."""
    done = sorted(p.name for p in (out / "checkpoints").glob("*") if (p / "COMPLETE").is_file())
    return done[-1] if done else "no checkpoint"


def wait_for_training(run: subprocess.Popen, out: Path) -> float:
    """Block until the run logs its first step (or ends); return when that was."""
    while run.poll() is None and not (out / "metrics.jsonl").exists():
        time.sleep(0.05)
    return time.perf_counter()


def trial(cfg: Path, out: Path, delay: float, reference: dict[str, torch.Tensor]) -> tuple[bool, str]:
    """Start, SIGKILL `delay` seconds into training, resume to the end; (identical?, where it landed)."""
    run = train(cfg, out, resume=False)
    wait_for_training(run, out)
    time.sleep(delay)
    if run.poll() is None:
        run.send_signal(signal.SIGKILL)
        run.wait()
    landed = where(out) if (out / "checkpoints").is_dir() else "before the first checkpoint"
    resumed = train(cfg, out, resume=True)
    _, err = resumed.communicate()
    if resumed.returncode != 0:
        return (
            False,
            f"{landed}; resume failed: {err.strip().splitlines()[-1] if err.strip() else resumed.returncode}",
        )
    final = weights(out / "model")
    same = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference)
    return same, landed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/vistune-kill-resume")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        synthesize(
            data, sizes={"train": 24, "val": 0, "test": 0, "compositional": 0}, workers=1, imagefolder=True
        )
    cfg = work / "config.json"
    cfg.write_text(json.dumps(config(data)))
    ref = train(cfg, work / "reference", resume=False)
    start = wait_for_training(ref, work / "reference")
    _, err = ref.communicate()
    if ref.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed: {err[-2000:]}")
    seconds = time.perf_counter() - start  # from the first logged step to the saved model
    reference = weights(work / "reference" / "model")
    rng = random.Random(a.seed)
    results = []
    for k in range(a.kills):
        delay = rng.uniform(0.05, 0.95) * seconds
        same, landed = trial(cfg, work / f"trial{k:02d}", delay, reference)
        results.append(same)
        verdict = "identical" if same else "DIFFERENT"
        print(f"trial {k:2d}: killed {delay:5.1f} s into training ({landed}): {verdict}", flush=True)
    print(f"{sum(results)}/{len(results)} identical (uninterrupted run: {seconds:.1f} s of training)")


if __name__ == "__main__":
    main()
