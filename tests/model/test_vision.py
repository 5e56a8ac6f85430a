"""Vision towers: shapes, feature_layer / use_cls, offline reload from a saved dir, arch round trip."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from vistune.config import VisionConfig
from vistune.model.vision import CLIP_MEAN, CLIP_STD, build_vision_tower

torch.set_num_threads(1)
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, image_size=32, patch_size=8)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _images(n: int = 2) -> list[Image.Image]:
    """Images of different sizes and modes: preprocess must square and RGB them all."""
    sizes = [(40, 20), (13, 77), (32, 32)]
    return [Image.new("RGB" if i % 2 == 0 else "L", sizes[i % 3], color=40 * i + 20) for i in range(n)]


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_hf_tower_shapes(kind):
    tower = build_vision_tower(VisionConfig(kind=kind, **TINY))
    pixels = tower.preprocess(_images(3))
    assert pixels.shape == (3, 3, 32, 32) and pixels.dtype == torch.float32
    feats = tower(pixels)
    assert tower.grid == (4, 4) and tower.hidden_size == 32
    assert feats.shape == (3, 16, 32)


def test_preprocess_normalises_with_clip_values():
    tower = build_vision_tower(VisionConfig(kind="clip", preprocess="squash", **TINY))
    pixels = tower.preprocess([Image.new("RGB", (50, 10), (255, 0, 128))])
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 128), CLIP_MEAN, CLIP_STD, strict=True)]
    assert torch.allclose(pixels[0, :, 5, 5], torch.tensor(expected), atol=1e-5)


def test_clip_feature_layer_and_cls():
    torch.manual_seed(0)
    base = build_vision_tower(VisionConfig(kind="clip", **TINY)).eval()
    pixels = base.preprocess(_images(2))
    with torch.no_grad():
        states = base.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        cls_tower = build_vision_tower(VisionConfig(kind="clip", use_cls=True, feature_layer=-2, **TINY))
        cls_tower.load_state_dict(base.state_dict())
        got = cls_tower.eval()(pixels)
        last = base(pixels)
    assert got.shape == (2, 17, 32) and cls_tower.num_tokens == 17
    torch.testing.assert_close(got, states[-2])  # CLS kept, layer -2
    torch.testing.assert_close(last, states[-1][:, 1:])  # CLS dropped, last layer
    assert not torch.allclose(states[-2][:, 1:], last)


def test_bad_feature_layer_and_siglip_cls_raise():
    with pytest.raises(ValueError, match="feature_layer"):
        build_vision_tower(VisionConfig(kind="clip", feature_layer=5, **TINY))
    with pytest.raises(ValueError, match="has no CLS"):
        build_vision_tower(VisionConfig(kind="siglip", use_cls=True, **TINY))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_load_from_saved_dir_matches(kind, tmp_path):
    torch.manual_seed(1)
    orig = build_vision_tower(VisionConfig(kind=kind, **TINY)).eval()
    orig.model.save_pretrained(tmp_path / "tower")
    loaded = build_vision_tower(VisionConfig(kind=kind, name_or_path=str(tmp_path / "tower"))).eval()
    assert loaded.grid == orig.grid and loaded.image_size == 32
    pixels = orig.preprocess(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), orig(pixels))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_arch_round_trip_and_weights_file(kind, tmp_path):
    torch.manual_seed(2)
    orig = build_vision_tower(VisionConfig(kind=kind, **TINY)).eval()
    arch = json.loads(json.dumps(orig.arch()))  # must survive JSON
    cfg = VisionConfig(kind=kind)  # default sizes differ: the arch, not the config, decides the shape
    rebuilt = build_vision_tower(cfg, arch=arch).eval()
    assert rebuilt.hidden_size == 32 and rebuilt.grid == (4, 4)
    save_file(orig.model.state_dict(), str(tmp_path / "w.safetensors"))
    pixels = orig.preprocess(_images(2))
    with torch.no_grad():
        assert not torch.allclose(rebuilt(pixels), orig(pixels))
        rebuilt.model.load_state_dict(orig.model.state_dict())
        torch.testing.assert_close(rebuilt(pixels), orig(pixels))
        from_file = build_vision_tower(
            VisionConfig(kind=kind, weights=str(tmp_path / "w.safetensors"), **TINY)
        )
        torch.testing.assert_close(from_file.eval()(pixels), orig(pixels))


def test_resnet18_grid_and_weights(tmp_path):
    torch.manual_seed(3)
    tower = build_vision_tower(VisionConfig(kind="resnet", image_size=64, patch_size=8))
    assert tower.grid == (2, 2) and tower.hidden_size == 512 and tower.num_tokens == 4
    n_params = sum(p.numel() for p in tower.parameters())
    assert n_params == 11_176_512  # ResNet-18 without its 1000-class fc (11,689,512 - 513,000)
    pixels = tower.preprocess(_images(2))
    assert pixels.shape == (2, 3, 64, 64)
    tower.eval()
    with torch.no_grad():
        feats = tower(pixels)
        fmap = tower.model(pixel_values=pixels).last_hidden_state  # (2, 512, 2, 2)
    assert feats.shape == (2, 4, 512)
    torch.testing.assert_close(feats[:, 1], fmap[:, :, 0, 1])  # row-major flattening of the map
    save_file(tower.model.state_dict(), str(tmp_path / "r18.safetensors"))
    cfg = VisionConfig(kind="resnet", image_size=64, weights=str(tmp_path / "r18.safetensors"))
    loaded = build_vision_tower(cfg).eval()
    rebuilt = build_vision_tower(VisionConfig(kind="resnet"), arch=json.loads(json.dumps(tower.arch())))
    assert rebuilt.grid == (2, 2) and rebuilt.hidden_size == 512
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), feats)
    with pytest.raises(ValueError, match="no CLS"):
        build_vision_tower(VisionConfig(kind="resnet", use_cls=True))


def test_resnet_feature_layer_selects_earlier_stage():
    tower = build_vision_tower(VisionConfig(kind="resnet", image_size=64, feature_layer=-2))
    assert tower.grid == (4, 4) and tower.hidden_size == 256
    with torch.no_grad():
        feats = tower.eval()(tower.preprocess(_images(1)))
    assert feats.shape == (1, 16, 256)  # layer3: stride 16 -> 4x4 tokens of width 256


def test_small_resnet_from_size_fields_and_saved_dir(tmp_path):
    cfg = VisionConfig(kind="resnet", resnet_depths=[1, 1], resnet_widths=[8, 16], image_size=32)
    tower = build_vision_tower(cfg).eval()
    assert tower.grid == (4, 4) and tower.hidden_size == 16  # stem /4, second stage /2 -> 32/8
    tower.model.save_pretrained(tmp_path / "resnet")
    loaded = build_vision_tower(VisionConfig(kind="resnet", name_or_path=str(tmp_path / "resnet"))).eval()
    pixels = tower.preprocess(_images(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels), tower(pixels))
