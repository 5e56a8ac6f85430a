"""A `vlm` stage on FSDP2-sharded weights: 2 CPU processes (gloo) train it and save the final model dir.

The worker (`_fsdp_vlm_worker.py`, run by torchrun) shards the tiny VLM's objective with `fully_shard` (each
decoder layer, then the objective as the root, which holds the frozen tower and the projector), trains 3
steps with the tower's feature cache and 3 without it, gathers the full state and saves it with
`save_vlm`. Here, one unsharded process loads those model dirs back. A single-process check shows that
the feature cache gives the batched tower's loss and is reused.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_vlm_worker import MODES, STEPS, make_stage, micro_batch, model_config
from helpers import shape_image
from safetensors.torch import load_file

from vistune.model.vlm import build_vlm, load_vlm
from vistune.train.objective import StageContext, build_batch
from vistune.train.vlm import VLMObjective

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_fsdp_vlm_worker.py")
IMAGES = [("red", "circle"), ("blue", "square"), ("green", "circle"), ("red", "square")]
N_RECORDS = 12  # record i shows image i % 4: each rank sees the same 2 images at every step


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny LLaVA JSON of one-image questions about shapes, and its image root."""
    root = tmp_path_factory.mktemp("vlm-data")
    (root / "images").mkdir()
    for color, shape in IMAGES:
        shape_image(color, shape).save(root / "images" / f"{color}-{shape}.png")
    records = []
    for i in range(N_RECORDS):
        color, shape = IMAGES[i % len(IMAGES)]
        question, answer = ("What colour is the shape?", f"It is {color}.")
        if i % 2 == 0:
            question, answer = "What shape is it?", f"A {shape}."
        records.append(
            {
                "id": f"r{i}",
                "image": f"{color}-{shape}.png",
                "conversations": [
                    {"from": "human", "value": f"<image>\n{question}"},
                    {"from": "gpt", "value": answer},
                ],
            }
        )
    for i in range(2):  # records 12 and 13: text only (the worker's TEXT_ONLY)
        records.append(
            {
                "id": f"text{i}",
                "conversations": [
                    {"from": "human", "value": "Say hello."},
                    {"from": "gpt", "value": "Hello!"},
                ],
            }
        )
    (root / "data.json").write_text(json.dumps(records), encoding="utf-8")
    return root / "data.json", root / "images"


@pytest.fixture(scope="module")
def fsdp_vlm_run(tmp_path_factory, tiny_llm_dir, data) -> tuple[Path, dict]:
    """The worker's output folder and its results, after one torchrun of 2 processes."""
    out = tmp_path_factory.mktemp("fsdp-vlm")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(WORKER), str(out), str(tiny_llm_dir),
           *map(str, data)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


@pytest.mark.slow  # torchrun with 2 processes: about 15 s on 2 cores
def test_sharded_vlm_stage_trains_with_and_without_feature_cache(fsdp_vlm_run):
    out, results = fsdp_vlm_run
    assert results["world_size"] == 2
    for mode, cache in MODES.items():
        for rank, seen in enumerate(results[mode]):
            where = (mode, rank)
            # Sharded as accelerate's transformer wrap does: each decoder layer and the root, every
            # parameter a DTensor; tied embeddings stay tied; the tower is frozen, the projector learns.
            assert seen["fsdp_modules"] == [True, True, True] and seen["all_dtensor"], where
            assert seen["tied_in_model"] and seen["frozen_tower"] and seen["trainable_projector"], where
            # AdamW's groups must be taken after sharding: fully_shard replaced every parameter.
            assert seen["early_params_in_model"] == 0 and seen["optimizer_is_trainable"], where
            assert len(seen["losses"]) == STEPS and all(math.isfinite(x) for x in seen["losses"]), where
            assert seen["cache"] is cache, where
            if cache:  # the tower sees each image once, inside the sharded root's forward
                assert all("image_keys" in k and "pixel_values" not in k for k in seen["batch_keys"]), where
                assert seen["new_images"] == [2, 0, 0] and seen["cached_features"] == 2, where
            else:  # the tower sees the pixels of every batch, inside the sharded root's forward
                assert all("pixel_values" in k and "image_keys" not in k for k in seen["batch_keys"]), where
                assert seen["cached_features"] == 0, where
        assert [r["gathered_size"] > 0 for r in results[mode]] == [True, False]  # full on rank 0 only
        assert results[mode][0]["gathered_tied"] and not results[mode][0]["gathered_dtensor"]
    # Each rank trained on batches of its own; with and without the cache, the same steps.
    assert results["cache"][0]["losses"] != results["cache"][1]["losses"]
    for rank in range(2):
        cached, batched = results["cache"][rank]["losses"], results["nocache"][rank]["losses"]
        assert cached == pytest.approx(batched, rel=1e-5, abs=1e-6), rank
    cached, batched = (
        load_file(str(out / "gathered-cache.safetensors")),
        load_file(str(out / "gathered-nocache.safetensors")),
    )
    assert cached.keys() == batched.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], batched[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_saved_model_dir_is_the_gathered_state(fsdp_vlm_run, data, tmp_path, mode):
    out, _ = fsdp_vlm_run
    gathered = load_file(str(out / f"gathered-{mode}.safetensors"))  # what rank 0 gathered and saved
    init = load_file(str(out / f"init-{mode}.safetensors"))  # the weights before training
    model = load_vlm(out / f"model-{mode}")
    state = model.state_dict()
    assert state.keys() == gathered.keys() == init.keys()
    for part in ("vision.", "projector.", "llm."):
        assert any(k.startswith(part) for k in state), part
    for name, tensor in state.items():
        assert tensor.dtype == gathered[name].dtype and torch.equal(tensor, gathered[name]), name
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    # Training moved every LLM and projector tensor; the frozen tower kept its weights.
    unchanged = sorted(k for k in state if torch.equal(gathered[k], init[k]))
    assert unchanged == sorted(k for k in state if k.startswith("vision."))

    objective = VLMObjective(make_stage(*data), model, StageContext(torch.device("cpu"), tmp_path, True))
    batch = build_batch(objective, micro_batch(0, 0))
    with torch.no_grad():
        loss = objective(batch) / objective.count(batch)
    assert math.isfinite(loss.item()) and loss.item() > 0


def test_feature_cache_gives_the_batched_tower_loss_and_is_reused(tiny_llm_dir, data, tmp_path):
    torch.manual_seed(0)
    model = build_vlm(model_config(tiny_llm_dir))
    ctx = StageContext(torch.device("cpu"), tmp_path, True)
    assert VLMObjective(make_stage(*data), model, ctx).cache  # a tiny stage caches by default
    on = VLMObjective(make_stage(*data, cache=True), model, ctx)
    off = VLMObjective(make_stage(*data, cache=False), model, ctx)
    assert on.cache and not off.cache and not model.vision.training
    calls = []
    model.vision.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    indices = [0, 1, 4]  # images 0, 1, 0: two distinct

    def loss_and_grads(objective, batch):
        model.zero_grad()
        loss = objective(batch)
        loss.backward()
        assert all(p.grad is None for p in model.vision.parameters())  # the tower runs without gradients
        return loss.detach(), [p.grad.clone() for p in model.projector.parameters()]

    batched = build_batch(off, indices)
    assert batched["pixel_values"].shape == (3, 3, 16, 16) and "image_keys" not in batched
    loss_off, grads_off = loss_and_grads(off, batched)
    assert calls == [3]  # one batched pass

    first = build_batch(on, indices)
    assert "pixel_values" not in first and len(first["image_keys"]) == 3
    assert list(first["new_images"]) == list(dict.fromkeys(first["image_keys"]))  # each distinct image once
    assert all(p.shape == (1, 3, 16, 16) for p in first["new_images"].values())
    calls.clear()
    loss_on, grads_on = loss_and_grads(on, first)
    assert calls == [1, 1]  # one pass per new image, alone
    assert set(on._features) == set(first["image_keys"]) and len(on._features) == 2
    assert all(f.device.type == "cpu" and f.shape == (16, 16) for f in on._features.values())
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    for g_on, g_off in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(g_on, g_off, rtol=1e-5, atol=1e-6)

    again = build_batch(on, indices)
    assert again["new_images"] == {} and again["image_keys"] == first["image_keys"]
    calls.clear()
    loss_again, grads_again = loss_and_grads(on, again)
    assert calls == [] and len(on._features) == 2  # the tower did not run: the cached features served
    assert torch.equal(loss_again, loss_on)
    assert all(torch.equal(a, b) for a, b in zip(grads_again, grads_on, strict=True))


def test_a_rank_without_images_trains_with_the_others(fsdp_vlm_run):
    """Text-only micro-batches on one process leave the projector unused there; every process must still
    reduce its gradients (the run would otherwise break in FSDP's collective)."""
    _, results = fsdp_vlm_run
    ranks = results["text_only"]
    assert [r["text_only_batch"] for r in ranks] == [False, True]
    assert all(math.isfinite(x) for r in ranks for x in r["losses"])
    assert all(r["projector_changed"] for r in ranks)
