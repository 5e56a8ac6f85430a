"""The training step's GPU options, checked for exactness on the CPU: the chunked LM-head loss
(`options.loss_chunk`), `torch.compile` of the loss (`options.compile`), bf16 autocast, and the copies
to the device (`move_to`, through pinned memory on CUDA).

fp32 sums in another order differ in the last bits: the chunked loss is held to 1e-6 relative, its
gradients to 1e-6 of their largest element (chunks of a few rows take BLAS's small-matrix paths, a few
1e-6 off; the chunks here are larger)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vistune.config import Stage, config_from_dict
from vistune.model.vlm import build_vlm
from vistune.train.objective import StageContext, build_batch, move_to
from vistune.train.vlm import VLMObjective

CPU = StageContext(torch.device("cpu"), Path("unused"))
FIRST, SECOND = [0, 1, 2], [3, 4]  # two micro-batches of different lengths


def _objective(one_stage, train: list[str], **options) -> VLMObjective:
    cfg = config_from_dict(one_stage(train, options=options))
    torch.manual_seed(0)
    model = build_vlm(cfg.model)
    torch.manual_seed(1)  # the same LoRA initialisation on every side
    objective = VLMObjective(cfg.stages[0], model, CPU)
    objective.train()
    return objective


def _loss_and_grads(objective: VLMObjective, indices: list[int]) -> tuple[torch.Tensor, dict]:
    for p in objective.parameters():
        p.grad = None
    loss = objective(build_batch(objective, indices))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def _assert_same(got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict], rtol: float) -> None:
    """The same loss (relative) and gradients (relative to each one's largest element)."""
    assert abs(got[0] - want[0]) <= rtol * abs(want[0]), (got[0], want[0])
    assert got[1].keys() == want[1].keys() and len(want[1]) > 0
    for name, grad in want[1].items():
        scale = grad.abs().max().clamp(min=1e-30)
        assert (got[1][name] - grad).abs().max() <= rtol * scale, name


@pytest.mark.parametrize("chunk", [7, 16])
@pytest.mark.parametrize("train", [["projector", "llm"], ["projector", "lora"]], ids=["full", "lora"])
def test_the_chunked_loss_is_the_plain_loss(one_stage, train, chunk):
    plain = _objective(one_stage, train)
    chunked = _objective(one_stage, train, loss_chunk=chunk)
    answers = sum(sum(label >= 0 for label in plain.data[i].labels[1:]) for i in FIRST)
    assert answers > 2 * chunk and answers % chunk  # several chunks, the last one shorter
    _assert_same(_loss_and_grads(chunked, FIRST), _loss_and_grads(plain, FIRST), rtol=1e-6)


@pytest.mark.parametrize(
    "train, backend",
    [(["projector", "llm"], "aot_eager"), (["projector", "lora"], "eager")],
    ids=["full", "lora"],
)
def test_the_compiled_loss_is_the_plain_loss(one_stage, train, backend):
    """aot_eager traces the forward and backward graphs as inductor does, without generating code (inductor
    takes a minute to compile here: `test_inductor_compiles_the_loss`); two batch lengths, one graph."""
    plain = _objective(one_stage, train)
    compiled = _objective(one_stage, train, compile=True, compile_backend=backend, loss_chunk=16)
    for indices in (FIRST, SECOND):
        _assert_same(_loss_and_grads(compiled, indices), _loss_and_grads(plain, indices), rtol=1e-6)


@pytest.mark.slow  # inductor generates and compiles C++ for both graphs: about a minute cold, 2 cores
def test_inductor_compiles_the_loss(one_stage):
    plain = _objective(one_stage, ["projector", "llm"])
    compiled = _objective(one_stage, ["projector", "llm"], compile=True)
    assert compiled.model.answer_loss_sum is not compiled._loss  # the model itself stays as it was
    _assert_same(_loss_and_grads(compiled, FIRST), _loss_and_grads(plain, FIRST), rtol=1e-5)


def test_the_options_train_as_the_plain_step(one_stage, tmp_path):
    """Two optimizer steps through the loop with the chunked, compiled loss: the same losses and weights."""
    from vistune.commands.train import train

    def run(name: str, **options) -> tuple[list[float], dict]:
        raw = one_stage(["projector", "llm"], options=options) | {"out": str(tmp_path / name)}
        model = train(config_from_dict(raw))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], load_file(model / "vision_projector.safetensors")

    losses_a, weights_a = run("plain")
    losses_b, weights_b = run("options", loss_chunk=8, compile=True, compile_backend="eager")
    assert len(losses_a) == 2
    torch.testing.assert_close(losses_b, losses_a, rtol=1e-6, atol=0)
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_bf16_autocast_stays_close_to_fp32(one_stage):
    """The loop runs the step under bf16 autocast on GPUs (accelerate's mixed precision); on the CPU the
    same autocast gives the fp32 loss and gradients to bf16's precision, chunked or not (this tiny random
    model's gradients are 8% off in bf16, the loss 2e-4)."""
    plain = _objective(one_stage, ["projector", "llm"])
    chunked = _objective(one_stage, ["projector", "llm"], loss_chunk=7)
    fp32 = _loss_and_grads(plain, FIRST)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sides = [_loss_and_grads(plain, FIRST), _loss_and_grads(chunked, FIRST)]
    for loss, grads in sides:
        assert loss.dtype == torch.float32  # the cross-entropy is taken in fp32
        assert 0 < abs(loss - fp32[0]) <= 2e-3 * abs(fp32[0])  # bf16 did run, within its precision
        for name, grad in fp32[1].items():
            assert (grads[name] - grad).norm() <= 0.15 * grad.norm(), name


def test_bad_step_options_are_named(one_stage):
    with pytest.raises(ValueError, match=r"stage 's': options: loss_chunk must be at least 1"):
        Stage(name="s", options={"loss_chunk": 0})
    with pytest.raises(ValueError, match=r"stages\[0\].options.compile: expected bool, got 'yes'"):
        config_from_dict(one_stage(["projector"], options={"compile": "yes"}))
    with pytest.raises(ValueError, match=r"stage 's': options.compile_backend 'fast' is not a torch.compile"):
        _objective(one_stage, ["projector"], compile=True, compile_backend="fast")


def test_move_to_copies_every_tensor_exactly():
    batch = {"ids": torch.arange(6).view(2, 3), "new": {"a.png": torch.rand(3, 4, 4)}, "keys": ["a.png"]}
    moved = move_to(batch, torch.device("cpu"))
    assert torch.equal(moved["ids"], batch["ids"]) and torch.equal(
        moved["new"]["a.png"], batch["new"]["a.png"]
    )
    assert moved["keys"] == ["a.png"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned copies need a CUDA device")
def test_pinned_copies_arrive_exactly():
    """On CUDA each tensor goes through pinned memory with a non-blocking copy; pinned by a DataLoader
    already or not, it arrives as it was, and the host batch is left unchanged."""
    pinned, pageable = torch.rand(64, 64).pin_memory(), torch.rand(64, 64)
    keep = (pinned.clone(), pageable.clone())
    moved = move_to({"pinned": pinned, "pageable": {"x": pageable}}, torch.device("cuda"))
    torch.cuda.synchronize()
    assert moved["pinned"].is_cuda and torch.equal(moved["pinned"].cpu(), keep[0])
    assert torch.equal(moved["pageable"]["x"].cpu(), keep[1]) and torch.equal(pageable, keep[1])
