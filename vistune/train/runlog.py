"""Training logs: a JSONL metrics file, TensorBoard scalars, the progress bar, and a loss-curve PNG."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from vistune.config import Stage


class RunLog:
    """Writes one JSON line per optimizer step to `run_dir/metrics.jsonl` (main process only)."""

    def __init__(self, run_dir: Path, active: bool):
        self.active = active
        self.path = run_dir / "metrics.jsonl"
        self.stage_name = ""
        self.bad_steps = 0
        self.bad_in_row = 0  # non-finite steps since the last finite one
        self.last_loss = math.nan  # of the last finite step
        self._last = time.perf_counter()
        self._tb = SummaryWriter(str(run_dir / "tensorboard")) if active else None

    def _write(self, row: dict[str, Any]) -> None:
        if self.active:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    def stage(self, stage: Stage, index: int, steps: int, about: dict) -> None:
        """Record the start of a stage and what its data held (kept/skipped/cut/dropped counts)."""
        self.stage_name = stage.name
        self.bad_in_row = 0
        self._write({"event": "stage", "stage": stage.name, "index": index, "steps": steps, **about})
        if self.active:
            print(f"stage {index} {stage.name}: {steps} steps, train={stage.train}, data={about}", flush=True)
        self._last = time.perf_counter()

    def step(
        self,
        step: int,
        loss: float,
        count: int,
        lr: float,
        ok: bool,
        bar: Any,
        seconds: float | None = None,
        extra: dict[str, float] | None = None,
    ) -> None:
        """Record one optimizer step (`seconds` it took: by default, the time since the last record;
        `extra`: more figures for its line, such as an objective's health); non-finite steps are
        counted, not plotted."""
        now = time.perf_counter()
        seconds, self._last = (now - self._last if seconds is None else seconds), now
        self.bad_steps += not ok
        self.bad_in_row = 0 if ok else self.bad_in_row + 1
        self.last_loss = loss if ok else self.last_loss
        row = {"stage": self.stage_name, "step": step, "loss": loss if ok else None, "targets": count,
               "lr": lr, "seconds": round(seconds, 4), "skipped_nonfinite": self.bad_steps}  # fmt: skip
        self._write(row | (extra or {}))
        if self.active and ok:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            self._tb.add_scalar(f"{self.stage_name}/loss", loss, step)
            self._tb.add_scalar(f"{self.stage_name}/lr", lr, step)
            for name, value in (extra or {}).items():
                self._tb.add_scalar(f"{self.stage_name}/{name}", value, step)

    def plot(self, png: Path) -> None:
        """Loss per stage against step, one panel per stage (matplotlib's object API: no global backend)."""
        rows = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]
        stages = list(dict.fromkeys(r["stage"] for r in rows if "loss" in r))
        if not stages:
            return
        fig = Figure(figsize=(4 * len(stages), 3))
        axes = fig.subplots(1, len(stages), squeeze=False)
        for ax, name in zip(axes[0], stages, strict=True):
            pts = [
                (r["step"], r["loss"]) for r in rows if r.get("stage") == name and r.get("loss") is not None
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts])
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_yscale("log")
        axes[0][0].set_ylabel("loss per target")
        fig.tight_layout()
        fig.savefig(png, dpi=100)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
