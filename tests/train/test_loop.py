"""The training loop: stages run end to end, resume is exact, two processes equal one, failures are loud."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_text_dir
from safetensors.torch import load_file

from vistune.commands.train import train
from vistune.config import Stage, config_from_dict
from vistune.model.vlm import build_vlm
from vistune.shapes.synth import synthesize
from vistune.train import checkpoint as ckpt
from vistune.train import loop
from vistune.train.kinds import needs_unused_parameters
from vistune.train.order import batch_indices
from vistune.train.rundir import config_sha256
from vistune.train.vlm import VLMObjective

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llm_dir) -> dict:
    """A tiny shapes world and the shared tiny random Llama (conftest) with the real SmolLM2 tokenizer."""
    base = tmp_path_factory.mktemp("train")
    synthesize(
        base / "data",
        sizes={"train": 12, "val": 0, "test": 0, "compositional": 0},
        workers=1,
        imagefolder=True,
    )
    return {"base": base, "data": base / "data", "llm": str(tiny_llm_dir), "text": tiny_text_dir(base)}


def make_cfg(world: dict, out: Path, steps: int = 6, batch: int = 2, accum: int = 1, **extra) -> dict:
    vision = {"kind": "clip", "image_size": 16, "patch_size": 4, "hidden_size": 16, "num_layers": 1,
              "num_heads": 2, "intermediate_size": 32}  # fmt: skip
    stage = {"batch_size": batch, "grad_accum": accum, "max_steps": steps, "max_length": 128, "lr": 0.01}
    return {
        "data_root": str(world["data"]),
        "out": str(out),
        "save_every": 2,
        "keep_last": 2,
        "model": {
            "vision": vision,
            "projector": {"name": "pixel_shuffle", "shuffle_factor": 2},
            "llm": {"name_or_path": world["llm"], "chat_template": "chatml"},
        },
        "stages": [
            {
                "name": "vision",
                "kind": "scene",
                "train": ["vision"],
                "data": [{"path": "scenes/train.jsonl", "image_root": "images"}],
                **stage,
            },
            {
                "name": "instruct",
                "train": ["projector", "lora"],
                "lora_rank": 4,
                "data": [
                    {"path": "train/vqa.json", "image_root": "images"},
                    {"path": "train/conversations.json", "image_root": "images"},
                ],
                **stage,
            },
        ],  # fmt: skip
        **extra,
    }


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = load_file(model_dir / "vision_projector.safetensors")
    out |= {f"llm.{k}": v for k, v in load_file(model_dir / "llm" / "model.safetensors").items()}
    return out


def test_stages_run_and_loss_falls(world, tmp_path):
    raw = make_cfg(world, tmp_path / "run", steps=25)
    raw["stages"][1]["train"] = ["projector", "llm"]  # full fine-tuning: a tiny random LLM learns fast
    cfg = config_from_dict(raw)
    model_dir = train(cfg)
    assert (model_dir / "vistune.json").is_file() and (tmp_path / "run" / "loss.png").is_file()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r.get("stage") == "instruct" and "loss" in r]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def every_kind(world: dict, out: Path) -> dict:
    """scene, classify, contrastive and LoRA instruct, 3 steps each, a checkpoint every 2 steps."""
    cfg = make_cfg(world, out, steps=3)
    classify = {
        "name": "labels",
        "kind": "classify",
        "train": ["vision"],
        "data": [{"path": "imagefolder/train"}],
        "batch_size": 4,
        "max_steps": 3,
        "lr": 0.01,
    }
    contrastive = {"name": "clip", "kind": "contrastive", "train": ["vision", "projector"],
                   "data": [{"path": "train/pairs.jsonl", "image_root": "images"}],
                   "options": {"text_tower": world["text"], "chunk_size": 2}, "batch_size": 4,
                   "max_steps": 3, "max_length": 32, "lr": 0.01}  # fmt: skip
    cfg["stages"] = [cfg["stages"][0], classify, contrastive, {**cfg["stages"][1], "train": ["lora"]}]
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> dict[str, torch.Tensor]:
    return weights(train(config_from_dict(every_kind(world, tmp_path_factory.mktemp("full")))))


# Optimizer steps counted over the run: 3 scene, 3 classify, 3 contrastive, 3 instruct. Killed at the
# n-th: 3 inside scene, after its step-2 checkpoint; 4 at the start of classify (scene complete); 6
# inside classify; 7 at the start of contrastive; 9 inside contrastive; 10 at the start of the LoRA
# stage (new adapters need the saved random state); 12 inside it.
@pytest.mark.parametrize("kill_at", [3, 4, 6, 7, 9, 10, 12])
def test_resume_after_kill_matches_uninterrupted(world, tmp_path, monkeypatch, uninterrupted, kill_at):
    resumed = kill_and_resume(every_kind(world, tmp_path / "b"), monkeypatch, kill_at)
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


# With two DataLoader workers building every stage's batches, killed inside scene, classify, contrastive
# and the LoRA stage: the loader resumes at the checkpoint's step, and the run ends with the weights of
# the uninterrupted run whose batches were built in the training process.
@pytest.mark.parametrize("kill_at", [3, 6, 9, 12])
def test_resume_with_workers_matches_uninterrupted(world, tmp_path, monkeypatch, uninterrupted, kill_at):
    cfg = every_kind(world, tmp_path / "w")
    for stage in cfg["stages"]:
        stage["workers"] = 2
    resumed = kill_and_resume(cfg, monkeypatch, kill_at)
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def kill_and_resume(cfg: dict, monkeypatch, kill_at: int, read=weights) -> dict[str, torch.Tensor]:
    """Train `cfg`, killed at the `kill_at`-th optimizer step of the run, then resume it: its weights
    (`read` of the final model dir)."""
    real_step, calls = loop.train_step, {"n": 0}

    def dying_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(cfg))
    monkeypatch.setattr(loop, "train_step", real_step)
    return read(train(config_from_dict(cfg), resume=True))


# Killed inside a save: while writing the end-of-scene checkpoint's weights (a half-written temporary
# dir), and after the end-of-contrastive checkpoint is renamed into place but before it is marked complete.
@pytest.mark.parametrize("where, nth", [("save_file", 3), ("_write_marker", 6)])
def test_resume_after_a_kill_inside_a_save(world, tmp_path, monkeypatch, uninterrupted, where, nth):
    real, calls = getattr(ckpt, where), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth:
            raise KeyboardInterrupt("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, where, dying)
    with pytest.raises(KeyboardInterrupt):
        train(config_from_dict(every_kind(world, tmp_path / "b")))
    monkeypatch.setattr(ckpt, where, real)
    resumed = weights(train(config_from_dict(every_kind(world, tmp_path / "b")), resume=True))
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def test_grad_accum_equals_big_batch(world, tmp_path):
    one = train(config_from_dict(make_cfg(world, tmp_path / "one", steps=3, batch=4)))
    acc = train(config_from_dict(make_cfg(world, tmp_path / "acc", steps=3, batch=2, accum=2)))
    a, b = weights(one), weights(acc)
    for key in a:
        # Float sums in another order differ by ~1e-7, but Adam divides each gradient by its own scale:
        # an element whose gradient is ~0 can move a fraction of a step (lr 0.01) either way.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    "stages, port", [(slice(None), 29533), (slice(1, None), 29534)], ids=["scene-and-vlm", "vlm"]
)
def test_two_processes_equal_one(world, tmp_path, stages, port):
    """torchrun with 2 CPU processes (gloo), batch 2 each, trains the same model as 1 process, batch 4:
    with a scene stage (DDP looks for unused parameters) and with a vlm stage alone (it does not)."""

    def cfg(out: Path, batch: int) -> dict:
        raw = make_cfg(world, out, steps=3, batch=batch)
        return raw | {"stages": raw["stages"][stages]}

    assert needs_unused_parameters(config_from_dict(cfg(tmp_path / "x", 2)).stages) is (stages.start is None)
    # The reference runs on one thread, as each worker does: CPU kernels round differently with the
    # thread count, which is not what this test is about.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(config_from_dict(cfg(tmp_path / "single", 4)))
    finally:
        torch.set_num_threads(threads)
    cfg_path = tmp_path / "ddp.json"
    cfg_path.write_text(json.dumps(cfg(tmp_path / "ddp", 2)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "vistune.cli", "train", str(cfg_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(single), weights(tmp_path / "ddp" / "model")
    for key in a:
        # Float sums in another order differ by ~1e-7, but Adam divides each gradient by its own scale:
        # an element whose gradient is ~0 can move a fraction of a step (lr 0.01) either way.
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-3)


def test_nonfinite_loss_stops_naming_the_step(world, tmp_path, monkeypatch):
    monkeypatch.setattr(
        VLMObjective, "forward", lambda self, batch: torch.tensor(float("nan"), requires_grad=True)
    )
    cfg = make_cfg(world, tmp_path / "nan", steps=6)
    cfg["stages"] = cfg["stages"][1:]
    with pytest.raises(RuntimeError, match=r"not finite for 3 steps in a row \(last at step 2\)"):
        train(config_from_dict(cfg))
    rows = [json.loads(x) for x in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_nonfinite"] for r in rows if "step" in r] == [1, 2, 3]


def test_bad_record_stops_or_is_skipped(world, tmp_path):
    records = json.loads((world["data"] / "train" / "vqa.json").read_text())
    records[1]["image"] = "train/missing.png"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(records))
    cfg = make_cfg(world, tmp_path / "bad", steps=1)
    cfg["stages"] = [
        cfg["stages"][1] | {"data": [{"path": str(bad), "image_root": str(world["data"] / "images")}]}
    ]
    with pytest.raises(ValueError, match=records[1]["id"]):
        train(config_from_dict(cfg))
    cfg["stages"][0]["on_bad_record"] = "skip"
    train(config_from_dict(cfg), overwrite=True)  # the failed attempt left its config and logs
    stage_row = json.loads((tmp_path / "bad" / "metrics.jsonl").read_text().splitlines()[0])
    assert stage_row["records"]["skipped_bad"] == 1


def test_contrastive_stage_trains_the_shared_tower(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "clip", steps=2, batch=4)
    contrastive = {"name": "clip", "kind": "contrastive", "train": ["vision", "projector"],
                   "data": [{"path": "train/pairs.jsonl", "image_root": "images"}],
                   "options": {"text_tower": world["text"]}, "batch_size": 4, "max_steps": 2,
                   "max_length": 32, "lr": 0.01}  # fmt: skip
    cfg["stages"] = [contrastive, cfg["stages"][1]]
    before = build_vlm(config_from_dict(cfg).model).vision.state_dict()
    model_dir = train(config_from_dict(cfg))
    after = {k[len("vision.") :]: v for k, v in weights(model_dir).items() if k.startswith("vision.")}
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "clip" / "stages" / "clip" / "model.safetensors").is_file()
    # resuming a finished run skips every stage and reproduces the same model
    again = train(config_from_dict(cfg), resume=True)
    assert all(torch.equal(v, weights(again)[k]) for k, v in weights(model_dir).items())


def test_group_by_length_keeps_a_random_permutation_of_similar_length_batches():
    n, lengths = (
        203,
        tuple(int(v) for v in torch.randint(5, 200, (203,), generator=torch.Generator().manual_seed(1))),
    )
    stage = Stage(name="s", batch_size=4, grad_accum=2)
    for grouped in (True, False):
        stage.group_by_length = grouped
        positions = [(step, micro) for step in range(25) for micro in range(2)]  # 200 of 203 records
        batches = [batch_indices(n, 0, s, m, 0, 1, stage, lengths) for s, m in positions]
        seen = [i for b in batches for i in b]
        assert len(set(seen)) == len(seen) == 200  # no record twice in an epoch
        spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)
        if grouped:
            assert all(
                [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True) for b in batches
            )
            assert spread < 40
        else:
            assert spread > 80
    # the order is a pure function of the position (exact resume) and still shuffled across epochs
    assert batch_indices(n, 0, 3, 1, 0, 1, stage, lengths) == batch_indices(n, 0, 3, 1, 0, 1, stage, lengths)
    stage.group_by_length = True
    assert batch_indices(n, 0, 0, 0, 0, 1, stage, lengths) != batch_indices(n, 0, 30, 0, 0, 1, stage, lengths)


def test_unknown_stage_kind_stops_before_any_work(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "rl")
    cfg["stages"][1]["kind"] = "rl"
    with pytest.raises(
        ValueError, match=r"stage 'instruct': kind 'rl' is not one of \['classify', 'clm', 'contrastive'"
    ):
        train(config_from_dict(cfg))
    assert not (tmp_path / "rl").exists()


def test_a_kind_refuses_parts_it_does_not_have(world, tmp_path):
    cfg = make_cfg(world, tmp_path / "parts")
    cfg["stages"][0]["train"] = ["vision", "lora"]
    with pytest.raises(
        ValueError, match=r"stage 'vision' \(scene\): train names \['lora'\]; this kind trains \['vision'\]"
    ):
        train(config_from_dict(cfg))


def test_a_run_dir_holds_one_run(world, tmp_path):
    """A fresh run into a finished run's dir stops; --overwrite replaces only vistune's outputs; --resume
    with another config names the fields that differ; operational fields may change."""
    raw = make_cfg(world, tmp_path / "one", steps=1)
    raw["stages"] = raw["stages"][1:]
    train(config_from_dict(raw))
    recorded = json.loads((tmp_path / "one" / "run.json").read_text())
    assert recorded["config_sha256"] == config_sha256(config_from_dict(raw).to_dict())
    with pytest.raises(ValueError, match=r"holds a previous run \(config.json, run.json, checkpoints"):
        train(config_from_dict(raw))
    changed = json.loads(json.dumps(raw))
    changed["stages"][0]["lr"] = 0.02
    with pytest.raises(ValueError, match=r"differs from the run's in stages\[0\].lr: 0.01 -> 0.02"):
        train(config_from_dict(changed), resume=True)
    train(config_from_dict({**raw, "save_every": 5}), resume=True)  # how often to save may change
    (tmp_path / "one" / "notes.txt").write_text("mine")
    train(config_from_dict(changed), overwrite=True)
    assert (tmp_path / "one" / "notes.txt").read_text() == "mine"
    assert json.loads((tmp_path / "one" / "config.json").read_text())["stages"][0]["lr"] == 0.02


def test_a_config_without_stages_trains_nothing(world, tmp_path):
    raw = make_cfg(world, tmp_path / "empty")
    raw["stages"] = []
    with pytest.raises(ValueError, match="no stages"):
        train(config_from_dict(raw))
    assert not (tmp_path / "empty").exists()
