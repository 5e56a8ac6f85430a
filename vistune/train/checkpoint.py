"""Crash-safe training checkpoints in safe formats (safetensors + JSON; nothing is unpickled).

A checkpoint is a directory `stageN-stepXXXXXXXX` holding the model weights and the optimizer's tensors
(safetensors), everything else (optimizer hyper-parameters, scheduler, RNG states, data position) as JSON,
and `sums.json`, the SHA-256 of each of those files, written last. States are taken with torch's distributed
state-dict API (full, on the CPU), so the same code saves and restores a plain module, a DDP replica or
FSDP-sharded weights; taking them is a collective step that every process runs, writing is the main
process's. A checkpoint is written under a temporary name, flushed to disk (fsync), renamed into place, and
only then marked COMPLETE: a run killed at any moment leaves the previous complete checkpoint untouched;
unmarked directories are ignored, and removed by the next save. Checkpoints are ordered by the numbers in
their names (stage, then step); resuming takes the newest one whose files match their sums and read whole,
and says which it skipped and why (a flipped bit, a truncated file, a state.json edited by hand).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

COMPLETE = "COMPLETE"
SUMS = "sums.json"
FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
# Full (unsharded) states on the CPU, keyed by parameter name.
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _load_options(module: nn.Module, strict: bool = True) -> StateDictOptions:
    """Full states are scattered into sharded (FSDP) parameters; whole ones load as they are."""
    sharded = any(isinstance(p, DTensor) for p in module.parameters())
    return StateDictOptions(full_state_dict=sharded, strict=strict)


@dataclass
class TrainingState:
    """Everything a checkpoint holds of the training objects, gathered by `gather_state`."""

    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None


def gather_state(
    module: nn.Module, optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None
) -> TrainingState:
    """The full states of a module (plain, DDP or FSDP) and its optimizer; every process must call it.

    Gathering copies the tensor of each name on its own; names that share one tensor in the module (tied
    weights) are made to share the copy again, so that a checkpoint stores it once.
    """
    model = get_model_state_dict(module, options=FULL)
    for alias, name in _aliases(get_model_state_dict(module)).items():  # uncopied: no gathering, no offload
        if name in model:  # the full state is only on the main process
            model[alias] = model[name]
    optim = get_optimizer_state_dict(module, optimizer, options=FULL) if optimizer is not None else {}
    return TrainingState(model, optim, scheduler.state_dict() if scheduler is not None else None)


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """Names whose tensor is the same as an earlier name's (tied weights, modules registered twice):
    {alias: first name}. Sharded tensors compare by their local shards."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, str] = {}
    for name, tensor in state.items():
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        if not local.numel():
            continue
        key = (local.data_ptr(), local.dtype, tuple(local.shape), tuple(local.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def _unique(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors stored once (tied weights, modules registered twice): (kept, {alias: kept name})."""
    aliases = _aliases(state)
    kept = {name: tensor.detach().contiguous() for name, tensor in state.items() if name not in aliases}
    return kept, aliases


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict as tensors (for safetensors) and plain JSON values that name them."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": state.get("param_groups", []), "state": {}}
    for param, entry in state.get("state", {}).items():
        plain["state"][param] = {}
        for name, value in entry.items():
            if torch.is_tensor(value):
                key = f"{param}/{name}"  # parameter names hold dots, never slashes
                tensors[key] = value.detach().contiguous().cpu()
                plain["state"][param][name] = {"tensor": key}
            else:
                plain["state"][param][name] = value
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_split_optimizer`."""

    def value(v: Any) -> Any:
        return tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v

    state = {param: {k: value(v) for k, v in entry.items()} for param, entry in plain["state"].items()}
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
    run_dir: Path, step_name: str, state: TrainingState, info: dict[str, Any], keep_last: int
) -> Path:
    """Write checkpoint `run_dir/checkpoints/<step_name>` atomically, then rotate old ones (main process)."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1, got {keep_last}")
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name
    tmp = root / f".tmp-{step_name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights, aliases = _unique(state.model)
    save_file(weights, str(tmp / "model.safetensors"))
    tensors, plain = _split_optimizer(state.optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"aliases": aliases, "optimizer": plain, "scheduler": state.scheduler, "rng": rng_state(), **info}
    (tmp / "state.json").write_text(json.dumps(meta), encoding="utf-8")
    for name in FILES:
        _fsync(tmp / name)  # on disk before the checkpoint can be called complete
    sums = {name: sha256_file(tmp / name) for name in FILES}
    (tmp / SUMS).write_text(json.dumps({"sha256": sums}, indent=1), encoding="utf-8")
    for name in (SUMS, "."):
        _fsync(tmp / name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _fsync(root)
    _write_marker(final)
    _rotate(root, keep_last)
    return final


def sha256_file(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(path: Path) -> None:
    marker = path / f".{COMPLETE}.tmp"
    marker.write_text("ok\n", encoding="utf-8")
    _fsync(marker)
    os.replace(marker, path / COMPLETE)
    _fsync(path)


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


def _check_safetensors(path: Path) -> None:
    """A safetensors file whose header parses and whose size holds every tensor it lists."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size > path.stat().st_size:
            raise ValueError(f"{path.name} has a corrupt header (it declares {size} bytes)")
        try:
            header = json.loads(f.read(size))
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path.name} has a corrupt header ({err})") from err
    entries = [v for k, v in header.items() if k != "__metadata__"] if isinstance(header, dict) else None
    offsets = [v.get("data_offsets") if isinstance(v, dict) else None for v in entries or []]
    if entries is None or not all(isinstance(o, list) and len(o) == 2 for o in offsets):
        raise ValueError(f"{path.name} has a corrupt header (not an object of tensors with data_offsets)")
    end = max((int(o[1]) for o in offsets), default=0)
    if path.stat().st_size < 8 + size + end:
        raise ValueError(f"{path.name} is truncated ({path.stat().st_size} bytes, needs {8 + size + end})")


def _check_sums(ckpt: Path) -> None:
    """Every file of the checkpoint has the SHA-256 that `sums.json` recorded when it was written."""
    try:
        sums = json.loads((ckpt / SUMS).read_text(encoding="utf-8"))["sha256"]
    except FileNotFoundError:
        raise ValueError(f"there is no {SUMS} (the SHA-256 of its files)") from None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise ValueError(f"{SUMS} is corrupt") from None
    for name in FILES:
        if not isinstance(sums, dict) or name not in sums:
            raise ValueError(f"{SUMS} lists no SHA-256 for {name}")
        if sha256_file(ckpt / name) != sums[name]:
            raise ValueError(f"{name} does not match its SHA-256 in {SUMS} (changed since it was written)")


def _check_info(info: Any) -> None:
    """state.json holds what resuming reads: stage and step numbers, the optimizer and random states."""
    if not isinstance(info, dict):
        raise ValueError(f"state.json holds {type(info).__name__}, not an object")
    for key, kind in (("stage", int), ("step", int), ("optimizer", dict), ("rng", dict), ("aliases", dict)):
        if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
            raise ValueError(f"state.json: field {key!r} is missing or not {kind.__name__}")
    if not isinstance(info.get("stage_complete", False), bool):
        raise ValueError("state.json: field 'stage_complete' is not true or false")


def usable_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]] | tuple[None, None]:
    """The newest complete checkpoint whose files match their sums and read whole, with its info; a broken
    newer one is skipped with a message saying why (a disk that lost data, a file edited by hand)."""
    for path in reversed(complete_checkpoints(run_dir)):
        try:
            info = read_info(path)
            _check_info(info)
            for name in ("model.safetensors", "optimizer.safetensors"):
                _check_safetensors(path / name)
            _check_sums(path)
            return path, info
        except (OSError, ValueError, KeyError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
            print(f"resume: skipping checkpoint {path.name}: {err}", file=sys.stderr, flush=True)
    return None, None


def read_info(ckpt: Path) -> dict[str, Any]:
    """The JSON part of a checkpoint (stage, step, data position, ...)."""
    return json.loads((ckpt / "state.json").read_text(encoding="utf-8"))


def _model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(ckpt / "model.safetensors"))
    aliases = read_info(ckpt).get("aliases", {})
    return state | {alias: state[name] for alias, name in aliases.items()}


def load_weights(ckpt: Path, module: nn.Module) -> None:
    """Load a checkpoint's model weights into a module (plain, DDP or FSDP); every parameter must match."""
    set_model_state_dict(module, _model_state(ckpt), options=_load_options(module))


def load_training_state(
    ckpt: Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG states; return the checkpoint's info."""
    info = read_info(ckpt)
    load_weights(ckpt, module)
    state = _join_optimizer(load_file(str(ckpt / "optimizer.safetensors")), info["optimizer"])
    tuples = {k for group in optimizer.param_groups for k, v in group.items() if isinstance(v, tuple)}
    # Not strict: a trainable parameter that never had a gradient (unused by the loss) has no state.
    set_optimizer_state_dict(module, optimizer, state, options=_load_options(module, strict=False))
    # JSON, and torch's loading of full states into sharded ones, make tuples (AdamW's betas) lists.
    for group in optimizer.param_groups:
        group.update({k: tuple(group[k]) for k in tuples if isinstance(group.get(k), list)})
    scheduler.load_state_dict(info["scheduler"])
    set_rng_state(info["rng"])
    return info
