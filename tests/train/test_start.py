"""Starting a run from a trained vistune model dir: the same weights, parts and template, then trained on."""

from __future__ import annotations

import torch

from vistune.commands.inspect import main_inspect
from vistune.commands.start import start_config, start_model
from vistune.commands.train import train
from vistune.config import config_from_dict
from vistune.model.vlm import load_vlm


def test_a_run_starts_from_a_finished_run_and_trains_on(one_stage, tmp_path, capsys):
    first = one_stage(["projector"])
    first["model"]["projector"]["position_codes"] = 8
    first["out"] = str(tmp_path / "first")
    model_dir = train(config_from_dict(first))
    trained = load_vlm(model_dir)

    second = one_stage(["lora"])
    second["model"] = {"from_pretrained": str(model_dir), "llm": {"chat_template": "chatml"}}
    cfg = config_from_dict(second | {"out": str(tmp_path / "second")})
    started = start_model(cfg.model)
    assert started.training and started.cfg.projector.position_codes == 8  # the parts of the first run
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(started.state_dict()[name], value, msg=name)
    parts, arch = start_config(cfg.model)
    assert parts.vision == trained.cfg.vision and arch["image_size"] == trained.vision.image_size

    final = load_vlm(train(cfg))  # trains on: LoRA merged into the LLM, the tower as it was
    llm_changed = [
        n for n, v in final.llm.state_dict().items() if not torch.equal(v, trained.llm.state_dict()[n])
    ]
    assert llm_changed
    torch.testing.assert_close(final.vision.state_dict(), trained.vision.state_dict())

    config_file = tmp_path / "second.yaml"
    config_file.write_text(__import__("json").dumps(second))
    assert main_inspect([str(config_file), "--n", "1"]) == 0  # image tokens counted from the saved parts
    assert "with loss" in capsys.readouterr().out
