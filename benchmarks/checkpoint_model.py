"""Write a model dir from a run's training checkpoint, to measure a model part-way through its run.

    python benchmarks/checkpoint_model.py RUN_DIR CHECKPOINT OUT_DIR

RUN_DIR is a training run (its config.json), CHECKPOINT one of its `checkpoints/stageN-stepXXXXXXXX`
dirs, OUT_DIR the model dir to write (as `vistune train` writes `RUN_DIR/model`). A checkpoint taken in
a stage with LoRA gets that stage's adapters, merged into the LLM as `save_vlm` does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vistune.config import load_config
from vistune.model.vlm import build_vlm, save_vlm
from vistune.train import checkpoint
from vistune.train.vlm import add_lora


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run_dir")
    parser.add_argument("checkpoint")
    parser.add_argument("out_dir")
    args = parser.parse_args()
    cfg = load_config(Path(args.run_dir) / "config.json", [])
    model = build_vlm(cfg.model)
    info = checkpoint.read_info(Path(args.checkpoint))
    stage = cfg.stages[info["stage"]]
    # stages up to this one that add LoRA (a LoRA stage's adapters are merged only when the run saves)
    for earlier in cfg.stages[: info["stage"] + 1]:
        if "lora" in earlier.train:
            add_lora(model, earlier)
            break
    checkpoint.load_weights(Path(args.checkpoint), model)
    save_vlm(model.eval(), args.out_dir)
    print(f"stage {stage.name!r} step {info.get('step')}: wrote {args.out_dir}")


if __name__ == "__main__":
    main()
