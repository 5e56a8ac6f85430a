"""Checkpoints prove themselves: SHA-256 sums checked on resume, falling back to the newest intact
checkpoint with a message naming what was wrong; the run's config hash checked on --resume; --resume on
a run dir that does not exist is an error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from vistune import cli
from vistune.commands.train import train
from vistune.config import config_from_dict
from vistune.train import checkpoint as ckpt
from vistune.train import loop
from vistune.train.rundir import resume_sha256


def _saved(tmp_path, steps=(1, 2)) -> list:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = ckpt.gather_state(model, optimizer, scheduler)
    info = {"stage": 0, "stage_complete": False}
    return [
        ckpt.save_checkpoint(tmp_path, f"stage0-step{s:08d}", state, info | {"step": s}, keep_last=5)
        for s in steps
    ]


def _flip_bit(path, offset=-3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def _resave_sums(ckpt_dir) -> None:
    """What a hand edit that also rewrote sums.json leaves: the files' structure is then checked."""
    sums = {name: ckpt.sha256_file(ckpt_dir / name) for name in ckpt.FILES}
    (ckpt_dir / ckpt.SUMS).write_text(json.dumps({"sha256": sums}))


def _edit_step(path, step=7) -> None:
    info = json.loads(path.read_text())
    path.write_text(json.dumps(info | {"step": step}))


def _header_not_an_object(path) -> None:
    header = b"[1, 2]"
    path.write_bytes(len(header).to_bytes(8, "little") + header)


CORRUPTIONS = {
    "one flipped bit in the weights": (lambda c: _flip_bit(c / "model.safetensors"), False,
                                       "model.safetensors does not match its SHA-256"),
    "one flipped bit in the optimizer": (lambda c: _flip_bit(c / "optimizer.safetensors"), False,
                                         "optimizer.safetensors does not match its SHA-256"),
    "state.json emptied to {}": (lambda c: (c / "state.json").write_text("{}"), False,
                                 "state.json: field 'stage' is missing"),
    "state.json one digit changed": (lambda c: _edit_step(c / "state.json"), False,
                                     "state.json does not match its SHA-256"),
    "state.json a string step, sums rewritten": (lambda c: _edit_step(c / "state.json", "2"), True,
                                                 "state.json: field 'step' is missing or not int"),
    "state.json a list": (lambda c: (c / "state.json").write_text("[]"), True, "state.json holds list"),
    "header valid JSON, not an object": (lambda c: _header_not_an_object(c / "model.safetensors"), True,
                                         "model.safetensors has a corrupt header"),
    "sums.json missing": (lambda c: (c / ckpt.SUMS).unlink(), False, "there is no sums.json"),
    "sums.json not JSON": (lambda c: (c / ckpt.SUMS).write_text("{"), False, "sums.json is corrupt"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_a_broken_newest_checkpoint_falls_back_naming_what_was_wrong(tmp_path, capsys, name):
    corrupt, resave, message = CORRUPTIONS[name]
    first, second = _saved(tmp_path)
    corrupt(second)
    if resave:
        _resave_sums(second)
    path, info = ckpt.usable_checkpoint(tmp_path)
    assert path == first and info["step"] == 1
    err = capsys.readouterr().err
    assert f"skipping checkpoint {second.name}: {message}" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_intact_checkpoints_pass_and_sums_cover_every_file(tmp_path):
    first, second = _saved(tmp_path)
    sums = json.loads((second / ckpt.SUMS).read_text())["sha256"]
    assert set(sums) == set(ckpt.FILES) and ckpt.usable_checkpoint(tmp_path)[0] == second


# --- through the training loop ----------------------------------------------------------------------------


@pytest.fixture
def cfg(one_stage, tmp_path) -> dict:
    """A LoRA vlm stage of 4 steps on the tiny world, a checkpoint after every step."""
    raw = one_stage(["projector", "lora"], max_steps=4, grad_accum=1)
    return raw | {"out": str(tmp_path / "run"), "save_every": 1, "keep_last": 3}


def _weights(model_dir) -> dict[str, torch.Tensor]:
    out = load_file(model_dir / "vision_projector.safetensors")
    return out | {f"llm.{k}": v for k, v in load_file(model_dir / "llm" / "model.safetensors").items()}


def _killed_at(cfg: dict, step: int, monkeypatch) -> None:
    real, calls = loop.train_step, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(cfg))
    monkeypatch.setattr(loop, "train_step", real)


def test_a_flipped_bit_in_the_latest_checkpoint_resumes_from_the_one_before(
    cfg, tmp_path, monkeypatch, capsys
):
    reference = _weights(train(config_from_dict(cfg | {"out": str(tmp_path / "reference")})))
    _killed_at(cfg, 4, monkeypatch)  # checkpoints after steps 1, 2 and 3
    latest = tmp_path / "run" / "checkpoints" / "stage0-step00000003"
    _flip_bit(latest / "model.safetensors")
    capsys.readouterr()
    resumed = _weights(train(config_from_dict(cfg), resume=True))
    err = capsys.readouterr().err
    assert "skipping checkpoint stage0-step00000003: model.safetensors does not match its SHA-256" in err
    assert "continuing from checkpoint stage0-step00000002" in err
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_resume_checks_the_config_hash_when_config_json_is_gone(cfg, tmp_path, monkeypatch):
    _killed_at(cfg, 3, monkeypatch)
    run = tmp_path / "run"
    (run / "config.json").unlink()
    changed = json.loads(json.dumps(cfg))
    changed["stages"][0]["lr"] = 0.5
    with pytest.raises(ValueError, match=r"SHA-256 differs from the run's \(run.json; config.json is"):
        train(config_from_dict(changed), resume=True)
    (run / "run.json").unlink()
    with pytest.raises(ValueError, match="lost its config.json and run.json"):
        train(config_from_dict(cfg), resume=True)
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert json.loads((checkpoints[-1] / "state.json").read_text())["config_sha256"]


def test_resume_may_change_only_the_operational_fields(cfg, tmp_path, monkeypatch):
    _killed_at(cfg, 3, monkeypatch)
    changed = json.loads(json.dumps(cfg))
    changed["stages"][0]["batch_size"] = 3
    with pytest.raises(ValueError, match=r"differs from the run's in stages\[0\].batch_size: 2 -> 3"):
        train(config_from_dict(changed), resume=True)
    allowed = json.loads(json.dumps(cfg)) | {"save_every": 2, "log_every": 1, "keep_last": 1}
    allowed["stages"][0]["workers"] = 1
    (tmp_path / "run" / "config.json").unlink()  # the recorded SHA-256 leaves them out too
    assert (train(config_from_dict(allowed), resume=True) / "vistune.json").is_file()


def test_a_checkpoint_written_under_another_config_is_refused(cfg, tmp_path, monkeypatch):
    _killed_at(cfg, 3, monkeypatch)
    run = tmp_path / "run"
    for name in ("config.json", "run.json"):
        (run / name).unlink()
    changed = json.loads(json.dumps(cfg))
    changed["stages"][0]["lr"] = 0.5
    (run / "config.json").write_text(json.dumps(config_from_dict(changed).to_dict()))
    with pytest.raises(ValueError, match="written under a config that differs"):
        train(config_from_dict(changed), resume=True)


def test_resume_on_a_run_dir_that_does_not_exist_is_an_error(cfg, tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert cli.main(["train", str(path), "--out", str(tmp_path / "nowhere"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nowhere" in err and "no run here" in err and "\n" not in err
    assert not (tmp_path / "nowhere").exists()


def test_a_run_recorded_before_a_stage_option_existed_resumes(cfg, tmp_path, monkeypatch):
    """A later version adds stage options with defaults: the earlier run's config.json and checkpoints
    lack them, and `--resume` still continues it (a changed value is still refused)."""
    reference = _weights(train(config_from_dict(cfg | {"out": str(tmp_path / "reference")})))
    _killed_at(cfg, 3, monkeypatch)
    run = tmp_path / "run"
    older = json.loads((run / "config.json").read_text())
    del older["stages"][0]["options"]["compile"]  # as an earlier version wrote it (default: false)
    (run / "config.json").write_text(json.dumps(older))
    older_sha = resume_sha256(older)
    for state in (run / "checkpoints").glob("*/state.json"):  # and its checkpoints' SHA-256
        info = json.loads(state.read_text())
        state.write_text(json.dumps(info | {"config_sha256": older_sha}))
    changed = json.loads(json.dumps(cfg))
    changed["stages"][0].setdefault("options", {})["loss_chunk"] = 7
    with pytest.raises(ValueError, match=r"differs from the run's in stages\[0\].options.loss_chunk"):
        train(config_from_dict(changed), resume=True)
    resumed = _weights(train(config_from_dict(cfg), resume=True))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
