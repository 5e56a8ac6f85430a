"""`vistune train CONFIG`: run a config's stages in order, resuming where a checkpoint left off.

Reads top to bottom: build the model, then for each stage build its objective (data + loss) from the
table of stage kinds and hand it to the one training loop (`vistune.train.loop`), which also drives
the single-stage commands (`vistune contrastive`, `vistune classifier`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vistune.commands.start import start_model
from vistune.config import Config, load_config
from vistune.model.vlm import save_vlm
from vistune.train.checkpoint import gather_state
from vistune.train.kinds import build_objective, needs_unused_parameters
from vistune.train.loop import open_run, run_stages


def train(cfg: Config, resume: bool = False, overwrite: bool = False) -> Path:
    """Run every stage of `cfg`; return the directory of the final model (loadable by chat/eval).

    `resume` continues the run in `cfg.out`; a fresh run into a dir that holds one stops unless
    `overwrite`."""
    if not cfg.stages:
        raise ValueError("the config has no stages: nothing to train")
    for stage in cfg.stages:  # every kind learns from data; an empty list would fail later, less clearly
        if not stage.data:
            raise ValueError(
                f"stage {stage.name!r}: data is empty; list what it trains on (data: [{{path: FILE}}])"
            )
    out, config = Path(cfg.out), cfg.to_dict()
    run = open_run(
        out, cfg.seed, cfg.save_every, cfg.keep_last, resume, overwrite, config, cfg.log_every,
        find_unused_parameters=needs_unused_parameters(cfg.stages),
    )  # fmt: skip
    model = start_model(cfg.model)
    context = run.context()
    run_stages(cfg.stages, model, lambda stage: build_objective(stage, model, context), run, resume)
    state = gather_state(model).model  # full weights on the main process, however they are sharded
    if run.accelerator.is_main_process:
        save_vlm(model, run.dir / "model", state)
        run.log.plot(run.dir / "loss.png")
    run.accelerator.wait_for_everyone()
    run.log.close()
    return run.dir / "model"


def main_train(argv: list[str] | None = None) -> int:
    """`vistune train CONFIG [--set key=value ...] [--resume] [--out DIR]`."""
    parser = argparse.ArgumentParser(prog="vistune train", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="YAML config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    parser.add_argument("--out", help="run directory (overrides the config's `out`)")
    parser.add_argument("--resume", action="store_true", help="continue from the last complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in the run dir")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.set + ([f"out={args.out}"] if args.out else []))
    model_dir = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"model": str(model_dir)}))
    return 0
