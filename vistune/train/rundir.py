"""What a run dir holds, and the guard that keeps two runs from mixing in one.

A fresh run into a dir that already holds a run's outputs stops (or, with `overwrite`, removes those
outputs first, and only those); `resume` continues the run that is there, and stops when the config
differs from the one the run recorded, naming the fields. The run records its config (`config.json`)
and the config's SHA-256 (`run.json`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

# What vistune writes into a run dir (training runs, and the single-stage commands' output dirs).
RUN_OUTPUTS = (
    "config.json", "run.json", "checkpoints", "metrics.jsonl", "tensorboard", "loss.png", "model", "stages",
    "model.safetensors", "vistune.json", "tokenizer", "vision.safetensors", "head.safetensors",
)  # fmt: skip
# Fields that may change between a run and its resumption: where it writes and how often.
OPERATIONAL = {"out", "save_every", "keep_last", "log_every"}


def config_sha256(config: dict[str, Any]) -> str:
    """The SHA-256 of a config's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two configs differ, with both values (operational fields ignored)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if not path and key in OPERATIONAL:
                continue
            sub = f"{path}.{key}" if path else key
            out += differences(old.get(key), new.get(key), sub)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [
            d
            for i, (a, b) in enumerate(zip(old, new, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]


def present_outputs(run_dir: Path) -> list[str]:
    """The run outputs a dir already holds."""
    return [name for name in RUN_OUTPUTS if (run_dir / name).exists()]


def check_run_dir(run_dir: Path, config: dict[str, Any] | None, resume: bool, overwrite: bool) -> None:
    """Stop before any work when this run would mix with the one already in `run_dir`."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir}: exists and is not a directory; choose another --out (or `out`)")
    if resume:
        saved = run_dir / "config.json"
        if config is not None and saved.is_file():
            changed = differences(json.loads(saved.read_text(encoding="utf-8")), config)
            if changed:
                listed = "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
                raise ValueError(
                    f"{run_dir}: --resume with a config that differs from the run's in {listed}; "
                    "resume with the same config, or start a new run"
                )
        return
    found = present_outputs(run_dir)
    if found and not overwrite:
        raise ValueError(
            f"{run_dir}: holds a previous run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's outputs (and nothing else) from `run_dir`."""
    for name in present_outputs(run_dir):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def record_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the resolved config and its SHA-256 into the run dir."""
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (run_dir / "run.json").write_text(
        json.dumps({"config_sha256": config_sha256(config)}) + "\n", encoding="utf-8"
    )
