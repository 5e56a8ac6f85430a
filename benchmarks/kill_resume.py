"""Kill a real training run with SIGKILL at random moments, resume it, and compare the final weights.

    python benchmarks/kill_resume.py [--kills 20] [--seed 0] [--work DIR]

A short run of every stage kind (scene, classify, contrastive, LoRA instruct) on a tiny shapes world
and a tiny Llama built from a config (SmolLM2's tokenizer) is first trained without interruption. Then,
for each trial, the same command starts in a fresh run dir, gets SIGKILL after a random share of the
uninterrupted run's time (counted from the moment its run dir holds its log, so that imports do not
swallow the kills), and is resumed with `--resume` until it finishes; its final weights are compared
bit for bit with the uninterrupted run's.

The trained process says which phase it is in (`--child`: it runs `vistune` with the phases marked in a
file), so each kill is known to have landed in one of: `data` (a stage's records read, checked and
rendered), `stage` (a stage's set-up and optimizer steps), `save` (writing a checkpoint), `stage
boundary` (between stages, and after the last one: the final model), or outside training: `start-up`
(building the model) or after the run ended. Only kills that landed while training ran (the four phases)
are counted; prints k/N identical and how many kills landed in each phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from vistune.shapes.synth import synthesize

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
PHASES = ("data", "stage", "save", "stage boundary")  # while training runs: the kills that count
PHASE_FILE = "phase.txt"  # beside the run dir


def mark(path: Path, phase: str) -> None:
    """Write the phase atomically, so that a kill never leaves the file half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(phase)
    os.replace(tmp, path)


def child(phase_file: Path, argv: list[str]) -> int:
    """`vistune ARGV` with its phases marked in `phase_file` (the trained process of a trial)."""
    from vistune import cli
    from vistune.commands import train as run
    from vistune.train import checkpoint, loop

    def wrap(module, name: str, before: str, after: str | None) -> None:
        real = getattr(module, name)

        def marked(*args, **kwargs):
            previous = phase_file.read_text() if phase_file.exists() else "start-up"
            mark(phase_file, before)
            result = real(*args, **kwargs)
            mark(phase_file, after or previous)
            return result

        setattr(module, name, marked)

    mark(phase_file, "start-up")
    wrap(run, "build_objective", "data", "stage")
    wrap(loop, "fit", "stage", "stage boundary")
    wrap(checkpoint, "save_checkpoint", "save", None)
    return cli.main(argv)


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
    """`vistune train` in a child process that marks its phases in `out`'s sibling phase file."""
    phases = out.parent / f"{out.name}.{PHASE_FILE}"
    cmd = [sys.executable, __file__, "--child", str(phases), "train", str(cfg), "--out", str(out)]
    cmd += ["--resume"] * resume
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


@dataclass
class Trial:
    """Where one kill landed and what came of it."""

    phase: str  # one of PHASES, "start-up", or "after the run ended"
    checkpoint: str  # the newest complete checkpoint the killed run left
    same: bool | None = None  # None: not counted (the kill did not land while training ran)
    failure: str = ""


def trial(cfg: Path, out: Path, delay: float, reference: dict[str, torch.Tensor]) -> Trial:
    """Start, SIGKILL `delay` seconds into the run, resume to the end, compare with `reference`."""
    run = train(cfg, out, resume=False)
    wait_for_training(run, out)
    time.sleep(delay)
    if run.poll() is not None:  # finished before the kill: nothing to resume, nothing to count
        return Trial("after the run ended", where(out))
    run.send_signal(signal.SIGKILL)
    run.wait()
    phase = (out.parent / f"{out.name}.{PHASE_FILE}").read_text()
    result = Trial(phase, where(out) if (out / "checkpoints").is_dir() else "no checkpoint")
    resumed = train(cfg, out, resume=True)
    _, err = resumed.communicate()
    if resumed.returncode != 0:
        result.same = False
        result.failure = err.strip().splitlines()[-1] if err.strip() else f"exit {resumed.returncode}"
        return result
    final = weights(out / "model")
    same = final.keys() == reference.keys() and all(torch.equal(final[k], reference[k]) for k in reference)
    result.same = same if phase in PHASES else None
    return result


def report(results: list[Trial], seconds: float) -> None:
    """k/N identical over the kills that landed while training ran, and the count of each phase."""
    counted = [r for r in results if r.same is not None]
    landed = Counter(r.phase for r in results)
    phases = ", ".join(f"{phase} {landed[phase]}" for phase in PHASES)
    others = ", ".join(f"{phase} {n}" for phase, n in landed.items() if phase not in PHASES) or "none"
    print(
        f"{sum(r.same for r in counted)}/{len(counted)} identical, of the kills that landed while training "
        f"ran ({phases}); not counted: {others} (uninterrupted run: {seconds:.1f} s)"
    )


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        raise SystemExit(child(Path(sys.argv[2]), sys.argv[3:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "vistune-kill-resume"))
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
    shutil.rmtree(work / "reference", ignore_errors=True)
    ref = train(cfg, work / "reference", resume=False)
    start = wait_for_training(ref, work / "reference")
    _, err = ref.communicate()
    if ref.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed: {err[-2000:]}")
    seconds = time.perf_counter() - start  # from the run dir's log to the saved model
    reference = weights(work / "reference" / "model")
    rng = random.Random(a.seed)
    results = []
    for k in range(a.kills):
        delay = rng.uniform(0.02, 0.98) * seconds
        out = work / f"trial{k:02d}"
        shutil.rmtree(out, ignore_errors=True)
        result = trial(cfg, out, delay, reference)
        results.append(result)
        verdict = {None: "not counted", True: "identical", False: f"DIFFERENT {result.failure}"}[result.same]
        print(f"trial {k:2d}: killed {delay:5.1f} s in, phase {result.phase!r} (newest checkpoint "
              f"{result.checkpoint}): {verdict}", flush=True)  # fmt: skip
    report(results, seconds)


if __name__ == "__main__":
    main()
