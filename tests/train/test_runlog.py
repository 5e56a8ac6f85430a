"""RunLog: metrics.jsonl rows, TensorBoard loss/lr scalars without non-finite steps, the loss PNG."""

from __future__ import annotations

import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vistune.config import Stage
from vistune.train.runlog import RunLog

# (stage, step, loss, lr, ok): the third step of "align" is non-finite and skipped
STEPS = [
    ("align", 1, 2.5, 1e-3, True),
    ("align", 2, 2.0, 9e-4, True),
    ("align", 3, math.nan, 8e-4, False),
    ("align", 4, 1.5, 7e-4, True),
    ("sft", 1, 1.25, 2e-4, True),
    ("sft", 2, 1.0, 1e-4, True),
]


class Bar:
    """Stands in for the tqdm progress bar."""

    def __init__(self) -> None:
        self.postfix: list[dict] = []

    def set_postfix(self, **kwargs) -> None:
        self.postfix.append(kwargs)


def _run(log: RunLog, bar: Bar) -> None:
    stages = {"align": Stage(name="align", train=["projector"]), "sft": Stage(name="sft", train=["lora"])}
    current = None
    for name, step, loss, lr, ok in STEPS:
        if name != current:
            index = list(stages).index(name)
            log.stage(stages[name], index, steps=4 if name == "align" else 2, about={"kept": 10 + index})
            current = name
        log.step(step, loss, count=7, lr=lr, ok=ok, bar=bar)
    log.close()


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture
def logged(tmp_path, capsys):
    bar = Bar()
    log = RunLog(tmp_path, active=True)
    _run(log, bar)
    return log, bar, capsys.readouterr().out


def test_tensorboard_scalars_per_stage_without_the_nonfinite_step(tmp_path, logged):
    scalars = _scalars(tmp_path)
    assert sorted(scalars) == ["align/loss", "align/lr", "sft/loss", "sft/lr"]
    for stage in ("align", "sft"):
        rows = [(step, loss, lr) for name, step, loss, lr, ok in STEPS if name == stage and ok]
        assert [s for s, _ in scalars[f"{stage}/loss"]] == [s for s, _, _ in rows]  # step 3 of align absent
        assert [v for _, v in scalars[f"{stage}/loss"]] == pytest.approx([v for _, v, _ in rows], rel=1e-6)
        assert [s for s, _ in scalars[f"{stage}/lr"]] == [s for s, _, _ in rows]
        assert [v for _, v in scalars[f"{stage}/lr"]] == pytest.approx([v for _, _, v in rows], rel=1e-6)


def test_metrics_jsonl_rows(tmp_path, logged):
    log, bar, out = logged
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in rows if r.get("event") == "stage"]
    assert [(e["stage"], e["index"], e["steps"], e["kept"]) for e in events] == [
        ("align", 0, 4, 10),
        ("sft", 1, 2, 11),
    ]
    steps = [r for r in rows if "event" not in r]
    assert [(r["stage"], r["step"]) for r in steps] == [(s[0], s[1]) for s in STEPS]
    assert [r["loss"] for r in steps] == [s[2] if s[4] else None for s in STEPS]  # NaN is written as null
    assert [r["skipped_nonfinite"] for r in steps] == [0, 0, 1, 1, 1, 1]
    assert all(r["targets"] == 7 and r["seconds"] >= 0 for r in steps)
    assert [r["lr"] for r in steps] == [s[3] for s in STEPS]
    assert log.bad_steps == 1 and log.last_loss == 1.0
    assert len(bar.postfix) == 5 and bar.postfix[-1] == {"loss": "1.0000", "lr": "1.00e-04"}
    assert "stage 0 align: 4 steps" in out and "stage 1 sft: 2 steps, train=['lora']" in out


def test_last_loss_is_that_of_the_last_finite_step(tmp_path):
    log = RunLog(tmp_path, active=True)
    log.stage(Stage(name="s"), 0, 2, {})
    log.step(1, 3.0, 1, 1e-3, True, Bar())
    log.step(2, math.inf, 1, 1e-3, False, Bar())
    log.close()
    assert log.last_loss == 3.0 and log.bad_steps == 1


def test_plot_writes_a_png_with_one_panel_per_stage(tmp_path, logged):
    log, _, _ = logged
    png = tmp_path / "loss.png"
    log.plot(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width = int.from_bytes(data[16:20], "big")
    assert width == 800  # two stages: 2 x 4 inches at 100 dpi


def test_inactive_runlog_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    bar = Bar()
    _run(RunLog(run_dir, active=False), bar)
    assert list(run_dir.iterdir()) == []
    assert bar.postfix == [] and capsys.readouterr().out == ""
