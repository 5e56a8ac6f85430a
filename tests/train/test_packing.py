"""Sequence packing (`pack: true`, vlm stages): several records per row, positions restarting at 0 for
each record, attention kept inside records by transformers. Packed and unpacked micro-batches give the
same loss-target count, the same normalised loss and the same gradients (fp32, atol 1e-5 / rtol 1e-4: the
packed rows take SDPA's masked path instead of its causal one, so sums run in another order)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vistune.model.vlm as vlm_module
from vistune.config import Stage, config_from_dict
from vistune.model.template import IGNORE
from vistune.model.vlm import build_vlm
from vistune.train.conversations import Sample, collate_packed, pack_rows
from vistune.train.objective import StageContext, build_batch
from vistune.train.vlm import VLMObjective

CPU = StageContext(torch.device("cpu"), Path("unused"))
TOL = {"atol": 1e-5, "rtol": 1e-4}


def _turns(*pairs: tuple[str, str]) -> list[dict]:
    return [t for q, a in pairs for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]


@pytest.fixture
def mixed(tiny_world, tmp_path) -> Path:
    """Seven records of very different lengths: one image or none, one turn or several."""
    long_answer = "a red circle above a blue square, and a small green star to the left of both of them"
    records = [
        {"id": "one-turn", "image": "train/train-000000.png",
         "conversations": _turns(("<image>\nColor?", "red"))},
        {"id": "multi", "image": "train/train-000001.png",
         "conversations": _turns(("<image>\nHow many stars?", "2"), ("And circles?", "1"), ("Shapes?", "3"))},
        {"id": "text-only", "conversations": _turns(("Say yes.", "yes"))},
        {"id": "long", "image": "train/train-000002.png",
         "conversations": _turns(("<image>\nDescribe the picture in detail.", long_answer))},
        {"id": "short", "image": "train/train-000003.png", "conversations": _turns(("<image>\nAny?", "no"))},
        {"id": "two-turn", "image": "train/train-000004.png",
         "conversations": _turns(("<image>\nIs there a star?", "yes"), ("What color is it?", "green"))},
        {"id": "text-multi", "conversations": _turns(("Count to three.", "one two three"), ("Again?", "no"))},
    ]  # fmt: skip
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _objective(one_stage, data: Path, train: list[str], attn: str, **stage) -> VLMObjective:
    raw = one_stage(train, **stage)
    raw["stages"][0]["data"] = [{"path": str(data), "image_root": "images"}]  # the tiny world's images
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    model = build_vlm(cfg.model)
    model.llm.set_attn_implementation(attn)
    torch.manual_seed(1)  # the same LoRA initialisation on both sides
    objective = VLMObjective(cfg.stages[0], model, CPU)
    objective.train()
    objective.model.vision.train("vision" in train)
    return objective


def _loss_and_grads(objective: VLMObjective, indices: list[int]) -> tuple[torch.Tensor, int, dict]:
    """The step's loss (summed over answer tokens, divided by their count, as `train_step` does), the
    count, and the gradients."""
    batch = build_batch(objective, indices)
    loss = objective(batch) / objective.count(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return loss.detach(), objective.count(batch), grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(
    "train", [["vision", "projector", "llm"], ["projector", "lora"]], ids=["full", "lora"]
)
def test_packed_and_unpacked_give_the_same_loss_and_gradients(one_stage, mixed, train, attn):
    plain = _objective(one_stage, mixed, train, attn)  # each side builds the same seeded model
    packed = _objective(one_stage, mixed, train, attn, options={"pack": True, "pack_length": 256})
    indices = list(range(len(plain)))
    assert len(indices) == 7
    loss_a, count_a, grads_a = _loss_and_grads(plain, indices)
    loss_b, count_b, grads_b = _loss_and_grads(packed, indices)
    rows_a, rows_b = (build_batch(o, indices)["input_ids"].shape[0] for o in (plain, packed))
    assert rows_b < rows_a == 7
    assert count_a == count_b > 0  # the normaliser: the same answer tokens
    torch.testing.assert_close(loss_b, loss_a, **TOL)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    if "vision" in train:
        assert any(n.startswith("model.vision.") for n in grads_a)  # the tower runs in the step
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], **TOL, msg=name)


def test_packing_fills_rows_and_keeps_each_record_whole(one_stage, mixed):
    plain = _objective(one_stage, mixed, ["projector"], "sdpa")
    packed = _objective(one_stage, mixed, ["projector"], "sdpa", options={"pack": True})  # rows of 128
    indices = list(range(len(plain)))
    a, b = build_batch(plain, indices), build_batch(packed, indices)
    assert b["input_ids"].shape[0] < a["input_ids"].shape[0] and b["input_ids"].shape[1] <= 128
    real = sum(len(plain.data[i].input_ids) for i in indices)
    padded_a, padded_b = a["input_ids"].numel() - real, b["input_ids"].numel() - real
    assert 0 <= padded_b < padded_a / 2
    # each row: records laid end to end, positions 0..n-1 for each, then the padding from 0 again
    positions, ids = b["position_ids"], b["input_ids"]
    segments = []
    for r in range(ids.shape[0]):
        starts = [c for c in range(ids.shape[1]) if positions[r, c] == 0] + [ids.shape[1]]
        segments += [ids[r, s:e].tolist() for s, e in zip(starts[:-1], starts[1:], strict=True)]
    records = [plain.data[i].input_ids for i in indices]
    for record in records:
        segments.remove(record)  # each record once, whole
    pad = plain.model.tokenizer.pad_token_id
    assert all(set(rest) == {pad} for rest in segments) and sum(map(len, segments)) == padded_b
    # images in the order their records' tokens appear in the flattened rows (the model scatters them so)
    by_ids = {tuple(plain.data[i].input_ids): plain.data[i].images for i in indices}
    flat, order = ids.flatten().tolist(), []
    for record in sorted(records, key=lambda rec: _find(flat, rec)):
        order += [str(p) for p in by_ids[tuple(record)]]
    assert b["image_keys"] == order and len(order) == 5
    assert torch.equal(b["answer_ids"].sort().values, a["answer_ids"].sort().values)


def _find(flat: list[int], part: list[int]) -> int:
    return next(i for i in range(len(flat)) if flat[i : i + len(part)] == part)


def test_flash_attention_sees_packed_rows_as_one_row(one_stage, mixed, monkeypatch):
    """flash-attention's varlen path finds packed records only in one row: the rows are flattened, which
    (checked here under SDPA) changes nothing."""
    objective = _objective(one_stage, mixed, ["projector", "llm"], "sdpa", options={"pack": True})
    batch = build_batch(objective, list(range(len(objective))))
    with torch.no_grad():
        rows = objective(batch)
        monkeypatch.setattr(vlm_module, "is_flash_attention_requested", lambda config: True)
        flat = objective(batch)
    assert batch["input_ids"].shape[0] > 1
    torch.testing.assert_close(flat, rows, **TOL)


def test_a_stage_trains_the_same_packed(one_stage, mixed, tmp_path):
    """Two optimizer steps of 2 x 2 records: the same losses and weights packed as unpacked."""
    from vistune.commands.train import train

    def run(name: str, **stage) -> tuple[list[float], dict]:
        raw = one_stage(["projector", "llm"], **stage) | {"out": str(tmp_path / name)}
        raw["stages"][0]["data"] = [{"path": str(mixed), "image_root": "images"}]
        model = train(config_from_dict(raw))
        rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in rows if "loss" in r], load_file(model / "vision_projector.safetensors")

    losses_a, weights_a = run("plain")
    losses_b, weights_b = run("packed", options={"pack": True})
    assert len(losses_a) == 2
    torch.testing.assert_close(losses_b, losses_a, **TOL)
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=1e-3, atol=1e-3, msg=key)


def test_a_record_longer_than_a_row_is_named():
    samples = [Sample([1] * n, [IGNORE] * n, [], f"data.json: record r{n}") for n in (5, 9, 3)]
    assert pack_rows(samples, 12) == [[1, 2], [0]]  # first fit, longest first: 9 + 3, then 5
    with pytest.raises(ValueError, match=r"data.json: record r9: 9 tokens do not fit a packed row of 8"):
        pack_rows(samples, 8)
    packed = collate_packed(samples, 0, 12)
    assert packed["position_ids"].tolist() == [list(range(9)) + [0, 1, 2], list(range(5)) + list(range(7))]
    assert (packed["labels"][:, [0, 9]] == IGNORE).all()  # no record's first label is a target


def test_packing_settings_are_checked():
    with pytest.raises(ValueError, match=r"'s': options.pack_length must be at least max_length \(128\)"):
        Stage(name="s", options={"pack": True, "pack_length": 64}, max_length=128)
    with pytest.raises(ValueError, match=r"stage 's': options.pack_length 256 is set but pack is false"):
        Stage(name="s", options={"pack_length": 256})
    with pytest.raises(ValueError, match=r"stage 's': options: unknown field\(s\) \['pack'\]"):
        Stage(name="s", kind="scene", train=["vision"], options={"pack": True})
    assert Stage(name="s", options={"pack": True}, max_length=100).options.row_length(100) == 100
    packed = Stage(name="s", options={"pack": True, "pack_length": 300}, max_length=100)
    assert packed.options.row_length(packed.max_length) == 300
