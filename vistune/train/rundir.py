"""What a run dir holds, and the guard that keeps two runs from mixing in one.

A fresh run into a dir that already holds a run's outputs stops (or, with `overwrite`, removes those
outputs first, and only those); `resume` continues the run that is there, and stops when the config
differs from the one the run recorded, naming the fields, or when there is no run to continue. The run
records its config (`config.json`) and in `run.json` the config's SHA-256 and that of the part a resumed
run must keep (`resume_sha256`: all but the operational fields), which is checked even when
`config.json` is gone.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from vistune.config import config_from_dict

# What vistune writes into a run dir (training runs, and the single-stage commands' output dirs).
RUN_OUTPUTS = (
    "config.json", "run.json", "checkpoints", "metrics.jsonl", "tensorboard", "loss.png", "model", "stages",
    "model.safetensors", "vistune.json", "tokenizer", "vision.safetensors", "head.safetensors",
)  # fmt: skip
# Fields that may change between a run and its resumption: where it writes, how often it saves and logs,
# how many checkpoints it keeps, and how many processes build a stage's batches (the same batches).
OPERATIONAL = {"out", "save_every", "keep_last", "log_every"}
STAGE_OPERATIONAL = {"workers"}


def config_sha256(config: dict[str, Any]) -> str:
    """The SHA-256 of a config's canonical JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def resume_sha256(config: dict[str, Any]) -> str:
    """The SHA-256 of what a resumed run must keep: the config without its operational fields."""
    fixed = {k: v for k, v in config.items() if k not in OPERATIONAL}
    if isinstance(fixed.get("stages"), list):
        fixed["stages"] = [
            {k: v for k, v in s.items() if k not in STAGE_OPERATIONAL} if isinstance(s, dict) else s
            for s in fixed["stages"]
        ]
    return config_sha256(fixed)


def _operational(path: str, key: str) -> bool:
    return (not path and key in OPERATIONAL) or (path.startswith("stages[") and key in STAGE_OPERATIONAL)


def differences(old: Any, new: Any, path: str = "") -> list[str]:
    """Dotted paths where two configs differ, with both values (operational fields ignored)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            if _operational(path, key):
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


def check_run_dir(run_dir: Path, config: dict[str, Any] | None, resume: bool, overwrite: bool) -> str | None:
    """Stop before any work when this run would mix with the one already in `run_dir`. On `resume`,
    returns the SHA-256 the run's checkpoints were written under when its recorded config is this one
    in an earlier version's form (see `check_resume`), else None."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir}: exists and is not a directory; choose another --out (or `out`)")
    if resume:
        return check_resume(run_dir, config)
    found = present_outputs(run_dir)
    if found and not overwrite:
        raise ValueError(
            f"{run_dir}: holds a previous run ({', '.join(found)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --out"
        )
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _current_form(saved: dict[str, Any]) -> dict[str, Any]:
    """A recorded run config as this version writes it: fields added since (new stage options) get their
    defaults, so a run recorded before they existed resumes. Other recorded dicts are kept as they are."""
    try:
        return config_from_dict(saved).to_dict()
    except (ValueError, TypeError, KeyError):
        return saved


def check_resume(run_dir: Path, config: dict[str, Any] | None) -> str | None:
    """Stop a `--resume` into a dir that does not exist, or whose run's config cannot be checked or differs
    in a field that may not change (named when the run's `config.json` is there, by the recorded SHA-256
    when it is not). A dir that holds no run yet (a quickstart's data only) starts one."""
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: --resume, but there is no run here (no such directory); check --out")
    if config is None or not present_outputs(run_dir):  # no recorded config, or nothing to resume
        return None
    saved, recorded = _read_json(run_dir / "config.json"), _read_json(run_dir / "run.json")
    if not isinstance(saved, dict) and not isinstance(recorded, dict):
        raise ValueError(
            f"{run_dir}: --resume, but the run lost its config.json and run.json, so its config cannot be "
            "checked; start a new run instead (--overwrite, without --resume)"
        )
    if isinstance(saved, dict):
        changed = differences(_current_form(saved), config)
        if changed:
            listed = "; ".join(changed[:8]) + (" ..." if len(changed) > 8 else "")
            raise ValueError(
                f"{run_dir}: --resume with a config that differs from the run's in {listed}; "
                "resume with the same config (only out, save_every, keep_last, log_every and a stage's "
                "workers may change), or start a new run"
            )
        # the fields were compared; the SHA-256 below stands in only when config.json is gone. The
        # checkpoints carry the recorded form's SHA-256, which may predate fields added since.
        return resume_sha256(saved)
    recorded = recorded if isinstance(recorded, dict) else {}
    if "resume_sha256" in recorded:
        expected, actual = recorded["resume_sha256"], resume_sha256(config)
    else:  # a run.json of an earlier version holds the whole config's SHA-256 only
        expected, actual = recorded.get("config_sha256"), config_sha256(config)
    if expected is not None and expected != actual:
        raise ValueError(
            f"{run_dir}: --resume with a config whose SHA-256 differs from the run's (run.json; config.json "
            "is missing, so the fields cannot be named); resume with the same config, or start a new run"
        )
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove a previous run's outputs (and nothing else) from `run_dir`."""
    for name in present_outputs(run_dir):
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def record_config(run_dir: Path, config: dict[str, Any]) -> None:
    """Write the resolved config and its SHA-256 into the run dir."""
    (run_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    recorded = {"config_sha256": config_sha256(config), "resume_sha256": resume_sha256(config)}
    (run_dir / "run.json").write_text(json.dumps(recorded) + "\n", encoding="utf-8")
