"""`benchmarks/gpu_suite.py`: `--smoke` runs every part on the CPU with tiny models and data, and a budget
that no longer fits skips what is left, saying so."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def _run(out: Path, *args: str, timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(SUITE), "--smoke", "--out", str(out), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )  # fmt: skip
    report = out / "gpu_suite.json"
    summary = json.loads(report.read_text(encoding="utf-8")) if report.is_file() else {}
    return done, summary


@pytest.mark.slow  # the whole suite on tiny models: about a minute on 2 quiet cores
def test_the_smoke_run_takes_every_part(tmp_path):
    started = time.perf_counter()
    done, summary = _run(tmp_path, timeout=900)
    seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    parts = summary["parts"]
    assert list(parts) == ["quickstart", "throughput", "generation", "serve", "syncs"]
    assert all(part["status"] == "ran" for part in parts.values()), {k: v["status"] for k, v in parts.items()}
    # every figure came from a run: phases, per-stage seconds, accuracy by question type
    quick = parts["quickstart"]
    assert set(quick["stage_seconds"]) == {"vision", "instruct"} and quick["total_s"] > 0
    assert quick["summary"]["vqa"]["test"]["by_question_type"]
    runs = parts["throughput"]["runs"]
    assert set(runs) == {"full plain", "full all", "lora plain"}
    for label, run in runs.items():
        assert run["status"] == "ran" and run["tokens_per_s"] > 0 and 0 < run["mfu"] < 1, label
    baseline = runs["full plain"]["baseline"]
    assert baseline["losses_agree"] and baseline["ratio"] > 0
    generation = parts["generation"]
    assert generation["identical"] == generation["records"] > 0
    assert parts["serve"]["ok"] > 0 and parts["serve"]["errors"] == {}
    syncs = parts["syncs"]
    assert syncs["full"]["per_step"] == 0 and syncs["lora"]["per_step"] == 0
    assert syncs["full, packed"]["per_step"] >= 1  # the counter sees transformers' read-back
    table = (tmp_path / "gpu_suite.md").read_text(encoding="utf-8")
    assert "| throughput | full plain / transformers LLaVA (same batches) |" in table
    assert table.splitlines()[-1] in done.stdout  # the table is printed too
    print(f"smoke run: {seconds:.0f} s")


def test_what_no_longer_fits_is_skipped_and_said(tmp_path):
    done, summary = _run(tmp_path, "--budget-s", "0", "--parts", "throughput,syncs", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {k: v["status"].split(":")[0] for k, v in summary["parts"].items()} == {
        "throughput": "skipped",
        "syncs": "skipped",
    }
    assert "needs ~" in summary["parts"]["syncs"]["status"]
    assert "| syncs | (all) | skipped: needs ~" in (tmp_path / "gpu_suite.md").read_text(encoding="utf-8")


def test_unknown_parts_are_named(tmp_path):
    done, _ = _run(tmp_path, "--parts", "quickstart,speed", timeout=300)
    assert done.returncode == 2 and "--parts: unknown speed" in done.stderr


def test_throughput_runs_leave_the_later_parts_their_time(tmp_path):
    """Each training run is budgeted with the later parts' estimates added: here none fits, each says so."""
    sys.path.insert(0, str(SUITE.parent))
    import gpu_suite
    import torch

    budget = gpu_suite.Budget(1.0, scale=0.01)  # a run needs 0.2 s or more, the later parts 1.05 s
    suite = gpu_suite.Suite(
        tmp_path, gpu_suite.Settings(smoke=True), budget, gpu_suite.Report(), torch.device("cpu")
    )
    suite.later = ["generation", "serve", "syncs"]
    runs = gpu_suite.part_throughput(suite)["runs"]
    assert list(runs)[:2] == ["full plain", "lora plain"]  # the order they would have run in
    assert len(runs) == len(gpu_suite.VARIANTS) * len(gpu_suite.TRAIN)
    assert all(r["status"].startswith("skipped: needs ~") for r in runs.values())
    assert all("the later parts' ~1 s included" in r["status"] for r in runs.values())
    assert not (tmp_path / "data").exists()  # nothing was built for runs that did not fit
