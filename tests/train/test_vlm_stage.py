"""The `vlm` objective's batch: the same loss without an attention mask as with one, and gradient
checkpointing changes memory, not the loss or its gradients."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from vistune.config import config_from_dict
from vistune.data.images import load_image
from vistune.model.vlm import build_vlm
from vistune.train.conversations import collate
from vistune.train.objective import StageContext, build_batch
from vistune.train.vlm import VLMObjective

CPU = StageContext(torch.device("cpu"), Path("unused"))


def _setup(raw: dict):
    cfg = config_from_dict(raw)
    torch.manual_seed(0)
    return cfg.stages[0], build_vlm(cfg.model)


def test_right_padded_batch_needs_no_attention_mask(one_stage):
    stage, model = _setup(one_stage(["projector", "llm"]))
    objective = VLMObjective(stage, model, CPU)
    indices = sorted(range(len(objective)), key=lambda i: len(objective.data[i].input_ids))[::5][:4]
    samples = [objective.data[i] for i in indices]
    reference = collate(samples, model.tokenizer.pad_token_id)
    assert (reference["attention_mask"] == 0).any()  # rows of different lengths: padding to ignore
    pixels = model.vision.preprocess([load_image(p) for p in reference.pop("images")])
    with torch.no_grad():
        expected = model.loss_sum(**reference, pixel_values=pixels)  # padding masked
        got = objective(build_batch(objective, indices))  # no mask, features from the cache
    assert build_batch(objective, indices)["attention_mask"] is None
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_keeps_loss_and_gradients(one_stage):
    raw = one_stage(["lora"], options={"gradient_checkpointing": True})
    stage, model = _setup(raw)
    plain_model = copy.deepcopy(model)
    torch.manual_seed(1)  # the same LoRA initialisation on both
    checkpointed = VLMObjective(stage, model, CPU)
    torch.manual_seed(1)
    plain = VLMObjective(config_from_dict(one_stage(["lora"])).stages[0], plain_model, CPU)
    assert model.llm.is_activation_checkpointing and not plain_model.llm.is_activation_checkpointing
    results = []
    for objective in (checkpointed, plain):
        objective.model.llm.train()
        loss = objective(build_batch(objective, [0, 1, 2]))
        loss.backward()
        grads = {n: p.grad for n, p in objective.model.llm.named_parameters() if "lora_" in n}
        results.append((loss.detach(), grads))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    checkpointed.finish()  # merged and back to keeping activations for later stages
    assert not model.llm.is_activation_checkpointing


def test_a_tower_learning_through_the_llm_gets_a_tenth_of_the_rate_unless_told(one_stage, capsys):
    from vistune.train.trainable import set_trainable

    stage, model = _setup(one_stage(["vision", "projector"], lr=0.01))
    objective = VLMObjective(stage, model, CPU)
    assert "learns at lr_vision 1.0e-03" in capsys.readouterr().out
    rates = [g["lr"] for g in set_trainable(objective, objective.parts(), stage) if g["vision"]]
    assert rates and rates == pytest.approx([0.001] * len(rates))
    stage, model = _setup(one_stage(["vision", "projector"], lr=0.01, lr_vision=0.005))
    VLMObjective(stage, model, CPU)
    assert stage.lr_vision == 0.005 and "learns at" not in capsys.readouterr().out
