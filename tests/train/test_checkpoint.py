"""Checkpoints: exact resume (weights, AdamW, LambdaLR, RNG), incomplete ones ignored, rotation, no pickle."""

from __future__ import annotations

import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from vistune.train import checkpoint as ckpt


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01, betas=(0.8, 0.95))
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=10)
    return model, optimizer, scheduler


def _step(model, optimizer, scheduler) -> None:
    """One step on data drawn from the global RNGs, so a wrongly restored RNG changes the trajectory."""
    x = torch.randn(5, 4) + float(np.random.rand()) + random.random()
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_round_trip_resumes_exactly(tmp_path):
    model, optimizer, scheduler = _setup()
    _seed_all(1)
    for _ in range(3):
        _step(model, optimizer, scheduler)
    path = ckpt.save_checkpoint(
        tmp_path,
        "stage0-step00000003",
        ckpt.gather_state(model, optimizer, scheduler),
        {"stage": 0, "step": 3},
        keep_last=2,
    )
    assert path == tmp_path / "checkpoints" / "stage0-step00000003" and (path / ckpt.COMPLETE).is_file()
    assert ckpt.latest_checkpoint(tmp_path) == path
    # the uninterrupted run continues...
    draws = _draws()
    for _ in range(3):
        _step(model, optimizer, scheduler)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_lr = scheduler.get_last_lr()

    # ...and a fresh process (new objects, other RNG states) resumes from the checkpoint
    fresh, fresh_opt, fresh_sched = _setup(seed=99)
    _seed_all(123)
    ckpt.load_weights(path, fresh)
    info = ckpt.load_training_state(path, fresh, fresh_opt, fresh_sched)
    assert info["stage"] == 0 and info["step"] == 3
    assert fresh_sched.last_epoch == 3 and fresh_opt.param_groups[0]["betas"][1] == 0.95
    assert _draws() == draws  # python, numpy and torch RNGs continue where they were
    for _ in range(3):
        _step(fresh, fresh_opt, fresh_sched)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert fresh_sched.get_last_lr() == expected_lr
    for p, q in zip(fresh.parameters(), model.parameters(), strict=True):
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh_opt.state[p][name], optimizer.state[q][name], rtol=0, atol=0)


def test_load_weights_is_strict(tmp_path):
    model, optimizer, scheduler = _setup()
    path = ckpt.save_checkpoint(
        tmp_path, "s1", ckpt.gather_state(model, optimizer, scheduler), {}, keep_last=1
    )
    other = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(RuntimeError):
        ckpt.load_weights(path, other)


def _save(run, name: str, keep_last: int = 10):
    model, optimizer, scheduler = _setup()
    return ckpt.save_checkpoint(
        run, name, ckpt.gather_state(model, optimizer, scheduler), {"name": name}, keep_last=keep_last
    )


def test_incomplete_checkpoints_are_ignored(tmp_path):
    good = _save(tmp_path, "stage0-step00000002")
    root = tmp_path / "checkpoints"
    # a crash after the rename but before the marker, and one during writing
    shutil.copytree(good, root / "stage0-step00000004")
    (root / "stage0-step00000004" / ckpt.COMPLETE).unlink()
    shutil.copytree(root / "stage0-step00000004", root / ".tmp-stage0-step00000006")
    (root / "stray-file").write_text("x")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.complete_checkpoints(tmp_path) == [good]
    assert ckpt.latest_checkpoint(tmp_path / "elsewhere") is None
    newer = _save(tmp_path, "stage0-step00000008")  # a later save cleans the leftovers up
    assert sorted(p.name for p in root.iterdir()) == [
        "stage0-step00000002",
        "stage0-step00000008",
        "stray-file",
    ]
    assert ckpt.latest_checkpoint(tmp_path) == newer


def test_keep_last_rotation(tmp_path):
    names = [f"stage{s}-step{t:08d}" for s, t in ((0, 2), (0, 4), (0, 6), (1, 2), (1, 4))]
    for name in names:
        _save(tmp_path, name, keep_last=2)
    kept = [p.name for p in ckpt.complete_checkpoints(tmp_path)]
    assert kept == names[-2:]
    assert ckpt.read_info(ckpt.latest_checkpoint(tmp_path))["name"] == names[-1]
    with pytest.raises(ValueError, match="keep_last"):  # 0 would keep nothing to resume from
        _save(tmp_path, "stage2-step00000002", keep_last=0)


def test_order_is_numeric_not_lexicographic(tmp_path):
    """stage10 comes after stage9, step 100000000 after step 99999999."""
    names = ["stage9-step99999999", "stage9-step100000000", "stage10-step00000001"]
    for name in names:
        _save(tmp_path, name, keep_last=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == names[1:]


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    _step(model, optimizer, scheduler)
    path = ckpt.save_checkpoint(
        tmp_path, "s1", ckpt.gather_state(model, optimizer, scheduler), {"step": 1}, keep_last=1
    )
    assert sorted(p.name for p in path.iterdir()) == [
        ckpt.COMPLETE, "model.safetensors", "optimizer.safetensors", "state.json", ckpt.SUMS
    ]  # fmt: skip

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    fresh, fresh_opt, fresh_sched = _setup(seed=5)
    ckpt.load_weights(path, fresh)
    ckpt.load_training_state(path, fresh, fresh_opt, fresh_sched)
    torch.testing.assert_close(fresh[0].weight, model[0].weight)


def test_tied_weights_round_trip(tmp_path):
    """Shared tensors (tied embeddings) are saved once and restored to both places."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = ckpt.save_checkpoint(
        tmp_path, "s1", ckpt.gather_state(model, optimizer, scheduler), {}, keep_last=1
    )
    fresh = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    fresh[1].weight = fresh[0].weight
    ckpt.load_weights(path, fresh)
    torch.testing.assert_close(fresh[1].weight, model[0].weight)
    assert fresh[1].weight is fresh[0].weight


def test_resume_skips_a_broken_newest_checkpoint_saying_why(tmp_path, capsys):
    model, optimizer, scheduler = _setup()
    state = ckpt.gather_state(model, optimizer, scheduler)
    first = ckpt.save_checkpoint(tmp_path, "stage0-step00000001", state, {"stage": 0, "step": 1}, keep_last=3)
    second = ckpt.save_checkpoint(
        tmp_path, "stage0-step00000002", state, {"stage": 0, "step": 2}, keep_last=3
    )
    assert ckpt.usable_checkpoint(tmp_path)[0] == second
    data = (second / "model.safetensors").read_bytes()
    (second / "model.safetensors").write_bytes(data[:-10])  # a disk that lost the tail
    path, info = ckpt.usable_checkpoint(tmp_path)
    assert path == first and info["step"] == 1
    assert (
        "skipping checkpoint stage0-step00000002: model.safetensors is truncated" in capsys.readouterr().err
    )
    (first / "state.json").write_text("{not json")
    assert ckpt.usable_checkpoint(tmp_path) == (None, None)


def test_a_checkpoint_is_flushed_to_disk_before_it_is_complete(tmp_path, monkeypatch):
    model, optimizer, scheduler = _setup()
    events = []
    real_fsync, real_replace = ckpt.os.fsync, ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(
        ckpt.os, "replace", lambda a, b: (events.append(f"replace {Path(b).name}"), real_replace(a, b))[1]
    )
    ckpt.save_checkpoint(tmp_path, "s1", ckpt.gather_state(model, optimizer, scheduler), {}, keep_last=1)
    marker = events.index(f"replace {ckpt.COMPLETE}")
    assert events[:4] == ["fsync"] * 4  # the three files and their directory, before the rename
    assert events[marker - 1] == "fsync" and events[marker + 1] == "fsync"
