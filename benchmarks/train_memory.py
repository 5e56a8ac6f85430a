"""Peak memory and step time of the quickstart's instruct stage at a given micro-batch split.

    python benchmarks/train_memory.py --data DIR [--batch-size 4] [--grad-accum 4] [--steps 4]

DIR is a shapes world (`vistune data synth --out DIR`). The stage runs through vistune's own loop
(`train_throughput.run_vistune`: `open_run` + `fit`) with an untrained tower (memory and speed do not
depend on what it learned); the figure is the process's peak resident memory, so run one split per
process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch
from train_throughput import run_vistune  # the sibling script: vistune's loop on one stage

from vistune.config import load_config
from vistune.extensions import load_extensions
from vistune.model.vlm import build_vlm
from vistune.shapes.quickstart import RECIPE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a shapes-world directory")
    parser.add_argument("--batch-size", type=int, default=4, help="records per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    load_extensions()
    cfg = load_config(RECIPE, [f"data_root={args.data}", "out=/tmp/vistune-bench"])
    stage = next(s for s in cfg.stages if s.kind == "vlm")
    stage.batch_size, stage.grad_accum, stage.max_steps = args.batch_size, args.grad_accum, args.steps
    torch.manual_seed(0)
    model = build_vlm(cfg.model)
    with tempfile.TemporaryDirectory() as tmp:
        _, steps, _ = run_vistune(model, stage, 0, Path(tmp) / "run")
    seconds = [sec for _, sec in steps][1:]  # step 0 fills the feature cache
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(
        f"instruct stage, {args.batch_size} x {args.grad_accum} records per step: peak memory {peak:.2f} GB, "
        f"{sum(seconds) / max(len(seconds), 1):.2f} s per step after the first"
    )


if __name__ == "__main__":
    main()
