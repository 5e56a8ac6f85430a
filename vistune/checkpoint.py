"""Crash-safe training checkpoints in safe formats (safetensors + JSON; nothing is unpickled).

A checkpoint is a directory `step-XXXXXXXX` holding the model weights, the optimizer's tensors
(safetensors) and everything else (optimizer hyper-parameters, scheduler, RNG states, data position) as
JSON. It is written under a temporary name, renamed into place, and only then marked COMPLETE: a run
killed at any moment leaves the previous complete checkpoint untouched; unmarked directories are
ignored, and removed by the next save. Checkpoints are ordered by the numbers in their names.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

COMPLETE = "COMPLETE"


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state_dict into tensors (for safetensors) and plain JSON values."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state["param_groups"], "state": {}}
    for idx, entry in state["state"].items():
        plain["state"][str(idx)] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
                plain["state"][str(idx)][name] = {"tensor": f"{idx}.{name}"}
            else:
                plain["state"][str(idx)][name] = value
    return tensors, plain


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for idx, entry in plain["state"].items():
        state[int(idx)] = {
            name: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for name, v in entry.items()
        }
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as JSON-able values."""
    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` saved."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def save_checkpoint(
    run_dir: Path,
    step_name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    info: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `run_dir/checkpoints/<step_name>` atomically, then rotate old ones.

    `optimizer` and `scheduler` may be None for an end-of-stage checkpoint of a stage that ran its own
    loop (nothing to resume inside it).
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name
    tmp = root / f".tmp-{step_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    empty = {"state": {}, "param_groups": []}
    tensors, plain = _flatten_optimizer(optimizer.state_dict() if optimizer else empty)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    sched = scheduler.state_dict() if scheduler else None
    state = {"optimizer": plain, "scheduler": sched, "rng": rng_state(), **info}
    (tmp / "state.json").write_text(json.dumps(state), encoding="utf-8")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_marker(final)
    _rotate(root, keep_last)
    return final


def _write_marker(path: Path) -> None:
    marker = path / f".{COMPLETE}.tmp"
    marker.write_text("ok\n", encoding="utf-8")
    os.replace(marker, path / COMPLETE)


def _rotate(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of interrupted saves."""
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for path in root.iterdir():
        if path.is_dir() and not (path / COMPLETE).is_file():
            shutil.rmtree(path, ignore_errors=True)


def _order(path: Path) -> list:
    """Sort key: numbers in the name compare as numbers (stage10 after stage9)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and (p / COMPLETE).is_file()), key=_order)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_info(ckpt: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (stage, step, data position, ...)."""
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))


def load_weights(ckpt: Path, model: nn.Module) -> None:
    """Load a checkpoint's model weights (strict: every parameter must match)."""
    load_model(model, str(ckpt / "model.safetensors"))


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """Restore optimizer, scheduler and RNG states; return the checkpoint's info."""
    info = read_info(ckpt)
    tensors = load_file(str(ckpt / "optimizer.safetensors"))
    optimizer.load_state_dict(_unflatten_optimizer(tensors, info["optimizer"]))
    scheduler.load_state_dict(info["scheduler"])
    set_rng_state(info["rng"])
    return info
