"""`vistune eval --explain N`: the answers of N sampled records mapped over their images, in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vistune.eval.command import main_eval
from vistune.model.vlm import save_vlm


def _data(root, n=3):
    records = []
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 200, 90)).save(root / f"{i}.png")
        human = {"from": "human", "value": f"<image>\nWhat colour is shape {i}?"}
        records.append({"id": f"q/{i}", "image": f"{i}.png", "answer": "green",
                        "conversations": [human, {"from": "gpt", "value": "green"}]})  # fmt: skip
    (root / "vqa.json").write_text(json.dumps(records))
    return root / "vqa.json"


def test_explain_adds_maps_of_sampled_answers_to_the_report(tiny_vlm, tmp_path, capsys):
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), tmp_path / "model")
    data, out = _data(tmp_path), tmp_path / "out"
    argv = [str(tmp_path / "model"), "--task", "vqa", "--data", str(data), "--out", str(out),
            "--explain", "2", "--max-new-tokens", "4"]  # fmt: skip
    assert main_eval(argv) == 0
    assert "mapped 2 answers" in capsys.readouterr().out
    index = json.loads((out / "explain" / "index.json").read_text())
    answers = {json.loads(line)["id"]: json.loads(line)["answer"] for line in open(out / "predictions.jsonl")}
    assert len(index) == 2 and len({e["id"] for e in index}) == 2
    for entry in index:
        assert entry["answer"] == answers[entry["id"]] and entry["method"] == "gradient"
        assert (out / entry["overlays"][0]).is_file()
        assert np.load(out / entry["overlays"][0].replace(".png", ".npy")).shape == (4, 4)
    text = (out / "report.md").read_text()
    assert "## Where the answers came from (gradient)" in text and text.count("![map of") == 2


def test_explain_needs_a_model_and_images(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main_eval(["--task", "vqa", "--predictions", str(tmp_path / "p.jsonl"), "--explain", "2"])
    assert "--explain maps a model's answers over images" in capsys.readouterr().err
