"""The contrastive stage: chunked embedding equals the full batch, training learns and saves, the
command line, errors that name the field, and two processes that stay identical."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from helpers import COLORS, SHAPES, read_pairs, shape_image, tiny_model, tiny_text_dir, write_pairs

from vistune.commands.contrastive import train_contrastive
from vistune.config import Stage
from vistune.model.contrastive import load_contrastive
from vistune.train.contrastive import ContrastiveObjective

torch.set_num_threads(1)

CPU = torch.device("cpu")


def _chunked_step(model, pixels, texts, chunk, scale=1.0):
    """Reference: autograd through chunk-wise forwards (the RNG order chunking uses), one backward."""
    img = torch.cat([model.image_embeddings(p) for p in pixels.split(chunk)])
    txt = torch.cat([model.text_embeddings(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    (model.loss(img, txt) * scale).backward()


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_chunked_objective_equals_full_batch_step(tmp_path, loss):
    """Chunks embedded under activation checkpointing (gradient caching) give the full batch's gradients."""
    model = tiny_model(tmp_path, loss)
    images = [shape_image(c, s) for c in COLORS for s in SHAPES]
    pixels, texts = model.vision.preprocess(images), [f"a {c} {s}" for c in COLORS for s in SHAPES]
    stage = Stage(name="s", kind="contrastive", train=["vision", "projector", "llm"], batch_size=8)
    pairs = [(Path("unused.png"), t) for t in texts]
    whole, chunked = (
        ContrastiveObjective(model, pairs, dataclasses.replace(stage, options={"chunk_size": n}), CPU)
        for n in (32, 3)
    )

    def grads(step) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(123)
        step()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batch = {"pixel_values": pixels, "texts": texts}
    # Without dropout, chunking equals the plain full-batch step.
    model.eval()
    full, cached = grads(lambda: whole(batch).backward()), grads(lambda: chunked(batch).backward())
    assert full.keys() == cached.keys() and len(full) > 20
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)
    # With dropout (BERT's 0.1), the recomputation must replay each chunk's masks to stay exact; the
    # objective's loss is the batch mean times its size.
    model.train()
    ref = grads(lambda: _chunked_step(model, pixels, texts, 3, scale=len(texts)))
    cached = grads(lambda: chunked(batch).backward())
    assert not torch.allclose(ref["text_proj.weight"], full["text_proj.weight"])  # dropout did act
    for name in ref:
        torch.testing.assert_close(cached[name], ref[name], rtol=1e-4, atol=1e-6)


def test_train_contrastive_learns_and_saves(tmp_path):
    pairs = read_pairs(*write_pairs(tmp_path))
    model = tiny_model(tmp_path)
    stage = Stage(
        name="lit", kind="contrastive", train=["vision", "projector"], lr=5e-3, max_steps=60,
        batch_size=16, warmup_ratio=0.1, options={"chunk_size": 8},
    )  # fmt: skip
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    train_contrastive(model, pairs, stage, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 60 and losses[-1] < 0.5 * losses[0]
    for k, v in model.text.state_dict().items():  # LiT: the text tower stayed locked
        torch.testing.assert_close(v, text_before[k])
    loaded = load_contrastive(tmp_path / "run")
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    sims = (
        loaded.embed_images([shape_image(c, s) for c in COLORS for s in SHAPES]) @ loaded.embed_texts(texts).T
    )
    assert (sims.argmax(1) == torch.arange(8)).float().mean() >= 0.75


def test_stage_errors_name_the_field(tmp_path):
    model, pairs = tiny_model(tmp_path), [(Path("x.png"), "a red circle")] * 8
    with pytest.raises(ValueError, match="grad_accum"):
        ContrastiveObjective(
            model, pairs, Stage(name="s", kind="contrastive", grad_accum=2), torch.device("cpu")
        )
    with pytest.raises(ValueError, match="fewer than one batch of 16"):
        ContrastiveObjective(
            model, pairs, Stage(name="s", kind="contrastive", batch_size=16), torch.device("cpu")
        )


def test_cli_trains_and_saves(tmp_path):
    from vistune.commands.contrastive import main_train_contrastive

    pairs, image_root = write_pairs(tmp_path, n_per_combo=1)
    args = [
        "--pairs",
        pairs,
        "--image-root",
        image_root,
        "--out",
        str(tmp_path / "m"),
        "--text",
        tiny_text_dir(tmp_path),
        "--loss",
        "siglip",
        "--vision-kind",
        "resnet",
        "--image-size",
        "32",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--chunk-size",
        "4",
        "--lock-text",
    ]
    assert main_train_contrastive(args) == 0
    model = load_contrastive(tmp_path / "m")
    assert model.loss_name == "siglip" and model.vision.config.kind == "resnet"
    stage = json.loads((tmp_path / "m" / "vistune.json").read_text())["stage"]
    assert stage["train"] == ["projector", "vision"] and stage["max_steps"] == 2


def _train_worker(rank: int, world: int, port: int, root: str) -> None:
    """One of two CPU processes running train_contrastive under accelerate; saves its final weights."""
    from safetensors.torch import save_file

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    root_path = Path(root)
    # Files are written before spawning: under torch.distributed, save_pretrained writes on rank 0 only.
    model = tiny_model(root_path, text_dir=str(root_path / "tiny-bert"))  # same seed on both ranks
    pairs = read_pairs(str(root_path / "pairs.jsonl"), str(root_path / "images"))
    stage = Stage(
        name="ddp", kind="contrastive", train=["vision", "projector"], max_steps=4, batch_size=4,
        warmup_ratio=0.0, lr=1e-2, options={"chunk_size": 2},
    )  # fmt: skip
    train_contrastive(model, pairs, stage, root_path / "run", seed=rank)
    state = {
        k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("vision", "image_proj"))
    }
    save_file(state, str(root_path / f"final{rank}.safetensors"))
    torch.distributed.barrier()
    os._exit(0)  # see _gathered_worker: skip gloo's teardown


def test_two_process_training_keeps_replicas_identical(tmp_path):
    """Gradients are averaged across processes, so both replicas take the same optimizer steps."""
    import socket

    from safetensors.torch import load_file

    write_pairs(tmp_path, n_per_combo=1)
    start = tiny_model(tmp_path).state_dict()  # also writes tmp_path/tiny-bert for the workers
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_train_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    a, b = load_file(str(tmp_path / "final0.safetensors")), load_file(str(tmp_path / "final1.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["image_proj.weight"], start["image_proj.weight"])  # they did train
