"""The main job end to end at toy size: data, both stages, evaluation, report; a re-run resumes."""

from __future__ import annotations

import json

from vistune.model.vlm import load_vlm
from vistune.shapes.quickstart import main_quickstart, pick_profile


def test_tiny_quickstart_runs_end_to_end_and_resumes(tmp_path, tiny_llm_dir, capsys):
    out = tmp_path / "qs"
    args = [
        "--out", str(out), "--train-images", "16", "--test-images", "4", "--eval-limit", "4",
        "--batch-size", "4", "--profile", "cpu", "--base", str(tiny_llm_dir), "--extra-limit", "3",
        "--describe-limit", "2",
        "--set", f"model.llm.name_or_path={tiny_llm_dir}",
        "--set", "model.vision.resnet_widths=[8, 16]",
        "--set", "stages.0.epochs=1", "--set", "stages.0.batch_size=8",
        "--set", "stages.1.max_steps=2", "--set", "stages.1.batch_size=4", "--set", "stages.1.grad_accum=1",
        "--set", "stages.1.data.1.limit=8",
    ]  # fmt: skip
    assert main_quickstart(args) == 0
    summary = json.loads((out / "quickstart.json").read_text())
    for split in ("test", "compositional", "shifted"):
        vqa = summary["vqa"][split]
        assert vqa["n"] == 4 and 0.0 <= vqa["exact_match"] <= 1.0
        assert summary["relations"][split]["n"] == 3  # the relation and binding types
    describe = summary["describe"]
    assert describe["detailed"]["n_records"] == 2 and describe["caption"]["n_records"] == 1
    assert 0.0 <= describe["detailed"]["graph_recall"] <= 1.0 and describe["multiturn"]["n_records"] == 4
    assert summary["profile"] == "cpu" and summary["device"].startswith(("CPU", "CUDA"))
    assert summary["pope"]["overall"]["n"] == 4 and 0.0 <= summary["pope"]["overall"]["f1"] <= 1.0
    # the tiny LLM is its own base here: the tuned model is compared with what it was before tuning
    assert summary["text"]["base"] == str(tiny_llm_dir) and summary["text"]["model_accuracy"] is not None
    assert 0.1 < summary["peak_memory_gb"] < 24  # this process and its data workers, read from the OS
    printed = capsys.readouterr().out
    assert (
        "exact-match accuracy on held-out single-turn VQA" in printed and "examples (test split)" in printed
    )
    assert (
        "profile: cpu" in printed and "POPE (test, 4 probes)" in printed and "plain-text questions" in printed
    )
    assert (
        "detailed descriptions (test, 2): scene-graph recall" in printed
        and "follow-up turns (test, 4)" in printed
    )
    assert "relating objects and binding colour to shape:" in printed
    header = next(line for line in printed.splitlines() if line.startswith("question type"))
    assert header.split()[2:] == ["test", "compositional", "shifted"]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert (
        manifest["sizes"]["shifted"] == 4
        and (out / "eval" / "shifted" / "vqa" / "predictions.jsonl").is_file()
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows if r.get("event") == "stage"] == ["vision", "instruct"]
    assert (out / "eval" / "test" / "vqa" / "predictions.jsonl").is_file() and (out / "loss.png").is_file()
    model = load_vlm(out / "model")
    assert model.image_tokens == 1 + 6 * 5  # the object count, then six objects of five words each
    # The same command again: data reused, every stage complete, the same figures.
    assert main_quickstart(args) == 0
    again = json.loads((out / "quickstart.json").read_text())

    def scores(result: dict) -> dict:
        return {split: {k: v for k, v in m.items() if k != "timing"} for split, m in result["vqa"].items()}

    assert scores(again) == scores(summary)
    assert "data: reusing" in capsys.readouterr().out
    assert sum(r.get("event") == "stage" for r in map(json.loads, (out / "metrics.jsonl").open())) == 2


def test_the_profile_follows_the_device(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert pick_profile("auto") == "gpu" and pick_profile("cpu") == "cpu"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert pick_profile("auto") == "cpu" and pick_profile("gpu") == "gpu"
