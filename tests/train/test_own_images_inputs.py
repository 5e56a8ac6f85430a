"""A newcomer's own images: odd ImageFolders and conversations that name missing images get one-line
errors, or train as documented (any size and mode; class names of several words)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vistune.cli import main


def _config(tmp_path, folder, conversations=None) -> str:
    stages = [{"name": "tower", "kind": "classify", "data": [{"path": str(folder)}], "train": ["vision"],
               "batch_size": 4, "max_steps": 2}]  # fmt: skip
    if conversations:
        data = [{"path": str(conversations), "image_root": str(tmp_path)}]
        stages.append({"name": "instruct", "data": data, "train": ["projector"], "batch_size": 2,
                       "max_steps": 1})  # fmt: skip
    vision = {"kind": "resnet", "image_size": 16, "resnet_depths": [1], "resnet_widths": [8]}
    model = {"vision": vision, "projector": {"name": "linear"}, "llm": {"name_or_path": "smollm2"}}
    cfg = {"out": str(tmp_path / "run"), "stages": stages, "model": model}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_any_size_and_mode_and_several_word_class_names_train(tmp_path, capsys, tiny_llm_dir):
    folder = tmp_path / "folder"
    for name in ("golden retriever", "cat"):
        (folder / name).mkdir(parents=True)
    Image.new("RGB", (40, 30), "red").save(folder / "golden retriever" / "a.png")
    Image.new("L", (64, 64), 128).save(folder / "golden retriever" / "b.png")
    Image.new("P", (20, 70)).save(folder / "cat" / "c.png")
    Image.new("RGBA", (33, 33), (0, 0, 255, 100)).save(folder / "cat" / "d.png")
    Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)).save(folder / "cat" / "e.png")
    Image.new("CMYK", (16, 16)).save(folder / "cat" / "f.jpg")
    config = _config(tmp_path, folder)
    assert main(["train", config, "--set", f"model.llm.name_or_path={tiny_llm_dir}"]) == 0
    assert "'classes': ['cat', 'golden retriever']" in capsys.readouterr().out


def test_one_class_and_missing_images_are_named_in_one_line(tmp_path, capsys, tiny_llm_dir):
    folder = tmp_path / "folder" / "cat"
    folder.mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(folder / "a.png")
    llm = f"model.llm.name_or_path={tiny_llm_dir}"
    assert main(["train", _config(tmp_path, folder.parent), "--set", llm]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("vistune train: error: ")
    assert err.endswith("1 class folder(s) ['cat']; a classifier needs at least 2")

    (tmp_path / "folder" / "dog").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "folder" / "dog" / "b.png")
    Image.new("RGB", (16, 16)).save(tmp_path / "ok.png")
    conversations = tmp_path / "conv.json"
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    records = [{"id": "r1", "image": "ok.png", "conversations": turns},
               {"id": "r2", "image": "gone.png", "conversations": turns}]  # fmt: skip
    conversations.write_text(json.dumps(records))
    assert main(["train", _config(tmp_path, folder.parent, conversations), "--set", llm, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "record 'r2'" in err and "gone.png" in err and "missing image" in err


@pytest.mark.parametrize("train", [["projector"], ["vision", "projector"]])
def test_a_classify_stage_says_what_train_means(tmp_path, capsys, tiny_llm_dir, train):
    folder = tmp_path / "folder"
    for name in ("a", "b"):
        (folder / name).mkdir(parents=True)
        Image.new("RGB", (16, 16)).save(folder / name / "x.png")
    config = _config(tmp_path, folder)
    assert main(["train", config, "--set", f"model.llm.name_or_path={tiny_llm_dir}",
                 "--set", f"stages.0.train={json.dumps(train)}"]) == 2  # fmt: skip
    assert "use train: [vision]" in capsys.readouterr().err
