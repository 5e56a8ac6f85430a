"""Embedding and zero-shot CLIs on a tiny trained model; recall@k against hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import COLORS, SHAPES, shape_image, tiny_model

from vistune.eval.retrieval import chance_at_k, main_eval_retrieval, recall_at_k
from vistune.infer.embed import label_embeddings, main_classify, main_embed, zero_shot
from vistune.model.contrastive import save_contrastive

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    save_contrastive(tiny_model(root, "siglip"), root / "saved")
    return root / "saved"


def _image_folder(root) -> None:
    for color in ("red", "blue"):
        for shape in SHAPES:
            (root / shape).mkdir(parents=True, exist_ok=True)
            shape_image(color, shape).save(root / shape / f"{color}.png")


def test_embed_images_and_texts(model_dir, tmp_path):
    _image_folder(tmp_path / "imgs")
    assert (
        main_embed([str(model_dir), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "ie")]) == 0
    )
    emb, index = (
        np.load(tmp_path / "ie" / "embeddings.npy"),
        json.loads((tmp_path / "ie" / "index.json").read_text()),
    )
    assert emb.shape == (4, 16) and emb.dtype == np.float32
    assert index == ["circle/blue.png", "circle/red.png", "square/blue.png", "square/red.png"]
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    (tmp_path / "t.txt").write_text("a red circle\n\na blue square\n", encoding="utf-8")
    assert (
        main_embed([str(model_dir), "--texts", str(tmp_path / "t.txt"), "--out", str(tmp_path / "te")]) == 0
    )
    assert json.loads((tmp_path / "te" / "index.json").read_text()) == ["a red circle", "a blue square"]
    assert np.load(tmp_path / "te" / "embeddings.npy").shape == (2, 16)


def test_zero_shot_picks_nearest_label_and_cli_writes(model_dir, tmp_path):
    img = np.eye(3, dtype=np.float32)[[2, 0, 1]]
    preds, sims = zero_shot(img, np.eye(3, dtype=np.float32))
    assert preds.tolist() == [2, 0, 1] and sims.shape == (3, 3)
    _image_folder(tmp_path / "imgs")
    out = tmp_path / "zs"
    assert (
        main_classify(
            [
                str(model_dir),
                "--images",
                str(tmp_path / "imgs"),
                "--labels",
                "circle, square",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 4 and {r["label"] for r in rows} <= {"circle", "square"}
    truth = [r["image"].split("/")[0] for r in rows]
    assert metrics["accuracy"] == pytest.approx(
        np.mean([r["label"] == t for r, t in zip(rows, truth, strict=True)])
    )


def test_label_embeddings_average_templates(model_dir):
    from vistune.model.contrastive import load_contrastive

    model = load_contrastive(model_dir)
    one = label_embeddings(model, ["red", "blue"], templates=("a {}",))
    direct = model.embed_texts(["a red", "a blue"]).numpy()
    np.testing.assert_allclose(one, direct, rtol=1e-5, atol=1e-6)
    two = label_embeddings(model, ["red"], templates=("a {}", "the {}"))
    mean = model.embed_texts(["a red", "the red"]).numpy().mean(0)
    np.testing.assert_allclose(two[0], mean / np.linalg.norm(mean), rtol=1e-5, atol=1e-6)


def test_recall_at_k_hand_made():
    img = np.eye(4, dtype=np.float32)
    # text j points mostly at image perm[j]: texts 0, 1 are right; 2 and 3 are swapped.
    txt = np.eye(4, dtype=np.float32)[[0, 1, 3, 2]] + 0.1 * np.eye(4, dtype=np.float32)
    r = recall_at_k(img, txt, k=(1, 2))
    assert r["t2i_R@1"] == 0.5 and r["i2t_R@1"] == 0.5
    assert r["t2i_R@2"] == 1.0 and r["i2t_R@2"] == 1.0
    perfect = recall_at_k(img, img, k=(1,))
    assert perfect == {"i2t_R@1": 1.0, "t2i_R@1": 1.0}


def test_recall_with_several_captions_per_image():
    img = np.eye(3, dtype=np.float32)
    # 5 captions: image 0 has texts 0 and 1 (text 1 points at image 2), image 1 has text 2 (points at
    # image 0; image 1 prefers text 1), image 2 has texts 3 and 4 (both right).
    txt = np.array([[1, 0, 0], [0, 0.5, 1], [0.9, 0.1, 0], [0, 0, 1.2], [0, 0.2, 1]], dtype=np.float32)
    r = recall_at_k(img, txt, k=(1,), text_image=[0, 0, 1, 2, 2])
    assert r["i2t_R@1"] == pytest.approx(2 / 3)  # images 0 and 2 have a caption at rank 0
    assert r["t2i_R@1"] == pytest.approx(3 / 5)  # texts 0, 3, 4 find their image first
    with pytest.raises(ValueError, match="text_image"):
        recall_at_k(img, txt, text_image=[0, 0, 1])


def test_chance_levels():
    c = chance_at_k(10, [1] * 10, k=(1, 5))
    assert c["t2i_R@1"] == pytest.approx(0.1) and c["i2t_R@1"] == pytest.approx(0.1)
    assert c["i2t_R@5"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)  # Monte Carlo check of the 2-captions-per-image formula
    hits = [len({0, 1} & set(rng.permutation(8)[:3].tolist())) > 0 for _ in range(20000)]
    assert chance_at_k(4, [2] * 4, k=(3,))["i2t_R@3"] == pytest.approx(np.mean(hits), abs=0.015)


def test_retrieval_cli(model_dir, tmp_path):
    lines = []
    (tmp_path / "imgs").mkdir()
    for c in COLORS:
        shape_image(c, "circle").save(tmp_path / "imgs" / f"{c}.png")
        lines += [
            json.dumps({"image": f"{c}.png", "caption": f"a {c} circle"}),
            json.dumps({"image": f"{c}.png", "caption": f"the {c} circle"}),
        ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = [
        str(model_dir),
        "--data",
        str(tmp_path / "pairs.jsonl"),
        "--image-root",
        str(tmp_path / "imgs"),
        "--out",
        str(tmp_path / "ret"),
    ]
    assert main_eval_retrieval(args) == 0
    report = json.loads((tmp_path / "ret" / "metrics.json").read_text())
    assert report["images"] == 4 and report["texts"] == 8
    assert report["recall"]["t2i_R@5"] == 1.0  # only 4 images
    assert report["chance"]["t2i_R@1"] == pytest.approx(0.25)
