"""The VLM: composition of every tower and projector with a tiny LLM, merge checks, loss, save/load, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import PROJECTORS, TOWERS
from peft import LoraConfig, get_peft_model
from PIL import Image
from torch.nn import functional as F

from vistune.data.records import Turn
from vistune.model.template import CHATML, IGNORE, render
from vistune.model.vision import build_vision_tower
from vistune.model.vlm import MODEL_FILE, VLM, build_vlm, load_vlm, save_vlm

# tokens per image: clip/siglip give a 4x4 grid, resnet 2x2; pixel_shuffle merges 2x2; resampler has 3
EXPECTED_TOKENS = {
    (kind, proj): {"pixel_shuffle": grid // 4, "resampler": 3}.get(proj, grid)
    for kind, grid in (("clip", 16), ("siglip", 16), ("resnet", 4))
    for proj in PROJECTORS
}


def _images(n: int, seed: int = 0) -> list[Image.Image]:
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (20, 24, 3), generator=g).byte().numpy()) for _ in range(n)]


def _batch(model, conversations: list[tuple[list[Turn], int]]) -> dict:
    """Render (turns, num_images) pairs and right-pad them, as the training data path does."""
    rendered = [
        render(t, model.tokenizer, image_tokens=model.image_tokens, num_images=n) for t, n in conversations
    ]
    width = max(len(r.input_ids) for r in rendered)
    pad = model.tokenizer.pad_token_id
    ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rendered])
    labels = torch.tensor([r.labels + [IGNORE] * (width - len(r.labels)) for r in rendered])
    mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids)) for r in rendered])
    n_images = sum(n for _, n in conversations)
    pixels = model.vision.preprocess(_images(n_images)) if n_images else None
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "pixel_values": pixels}


CONVS = [
    ([Turn("user", "<image>\nWhat is shown?"), Turn("assistant", "A red circle.")], 1),
    ([Turn("user", "Compare <image> with <image>, please."), Turn("assistant", "The first is larger.")], 2),
    ([Turn("user", "No picture here."), Turn("assistant", "Then I cannot see anything at all.")], 0),
]


def _logits(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        embeds = model.embed(batch["input_ids"], batch["pixel_values"])
        return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits


@pytest.fixture(scope="module")
def frozen_llm(tiny_llm_dir):
    """One tiny LLM + tokenizer shared by the composition tests (frozen, so they cannot change it)."""
    from vistune.model.llm import load_llm, load_tokenizer

    tokenizer = load_tokenizer(str(tiny_llm_dir))
    return load_llm(str(tiny_llm_dir), tokenizer, torch.float32).requires_grad_(False), tokenizer


@pytest.mark.parametrize("kind", sorted(TOWERS))
@pytest.mark.parametrize("projector", PROJECTORS)
def test_every_tower_and_projector_composes(frozen_llm, tiny_model_config, kind, projector):
    cfg = tiny_model_config(kind, projector)
    torch.manual_seed(0)
    model = VLM(cfg, build_vision_tower(cfg.vision), *frozen_llm)
    assert model.image_tokens == EXPECTED_TOKENS[kind, projector]
    batch = _batch(model, CONVS)
    image_id = model.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 3 * model.image_tokens
    model.train()
    loss = model(**batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for part in (model.vision, model.projector):  # gradients reach the tower through the merge
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_loss_sum_equals_reference_cross_entropy(tiny_vlm):
    """loss_sum (logits only at labelled positions) = HF logits + summed CE over shifted labels."""
    model = tiny_vlm("clip", "pixel_shuffle")
    batch = _batch(model, CONVS)
    logits = _logits(model, batch)
    ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
    with torch.no_grad():
        got = model.loss_sum(**batch)
        mean = model(**batch)
    torch.testing.assert_close(got, ref)
    n = int((batch["labels"][:, 1:] != IGNORE).sum())
    torch.testing.assert_close(mean, ref / n)


def test_padded_batch_equals_samples_one_by_one(tiny_vlm):
    """Right padding and the image order across the batch do not change any sample's loss."""
    model = tiny_vlm("siglip", "mlp2x_gelu")
    with torch.no_grad():
        together = model.loss_sum(**_batch(model, CONVS))
        alone = [model.loss_sum(**_one(model, i)) for i in range(len(CONVS))]
    torch.testing.assert_close(together, sum(alone), rtol=1e-5, atol=1e-4)


def _one(model, index: int) -> dict:
    """Sample `index` of CONVS alone, with its own images (the same pixels as in the full batch)."""
    full = _batch(model, CONVS)
    first = sum(n for _, n in CONVS[:index])
    count = CONVS[index][1]
    batch = _batch(model, [CONVS[index]])
    batch["pixel_values"] = full["pixel_values"][first : first + count] if count else None
    return batch


def test_image_features_land_on_image_positions(tiny_vlm):
    model = tiny_vlm("clip", "linear")
    batch = _batch(model, CONVS[:2])
    ids = batch["input_ids"]
    mask = ids == model.image_token_id
    with torch.no_grad():
        embeds = model.embed(ids, batch["pixel_values"])
        features = model.encode_images(batch["pixel_values"])  # (3, 16, D)
        text = model.llm.get_input_embeddings()(ids)
    torch.testing.assert_close(embeds[~mask], text[~mask])  # text positions untouched
    torch.testing.assert_close(embeds[mask], features.reshape(-1, features.shape[-1]))  # in reading order


def test_vision_features_path_equals_pixel_path(tiny_vlm):
    model = tiny_vlm("resnet", "pixel_shuffle")
    batch = _batch(model, CONVS)
    with torch.no_grad():
        features = model.vision(batch["pixel_values"])
        via_pixels = model.loss_sum(**batch)
        batch["vision_features"], batch["pixel_values"] = features, None
        via_features = model.loss_sum(**batch)
        embeds = model.embed(batch["input_ids"], vision_features=features)
    torch.testing.assert_close(via_features, via_pixels)
    assert embeds.shape[:2] == batch["input_ids"].shape


def test_count_mismatch_is_a_clear_error(tiny_vlm):
    model = tiny_vlm("clip", "pixel_shuffle")
    batch = _batch(model, CONVS[:2])  # 3 images' worth of image tokens
    pixels = batch["pixel_values"]
    with pytest.raises(ValueError, match=r"12 image-token positions, 2 image\(s\) x 4 tokens"):
        model.embed(batch["input_ids"], pixels[:2])
    with pytest.raises(ValueError, match="image tokens and image features do not match"):
        model.embed(batch["input_ids"][:, :-1] * 0 + 5, pixels)  # images but no image tokens
    with pytest.raises(ValueError, match="12 image token"):
        model.embed(batch["input_ids"])  # image tokens but no images
    text_only = _batch(model, CONVS[2:])
    assert model.embed(text_only["input_ids"]).shape[1] == text_only["input_ids"].shape[1]


@pytest.mark.parametrize(
    "kind, projector", [("clip", "pixel_shuffle"), ("resnet", "resampler"), ("siglip", "linear")]
)
def test_save_load_round_trip_gives_identical_logits(tiny_vlm, tmp_path, kind, projector):
    model = tiny_vlm(kind, projector, chat_template="chatml")
    with torch.no_grad():  # move the projector away from its init so a skipped load would show
        for p in model.projector.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_vlm(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / MODEL_FILE).read_text())["model"]["projector"]["name"] == projector
    loaded = load_vlm(tmp_path / "m")
    assert loaded.image_tokens == model.image_tokens and loaded.tokenizer.chat_template == CHATML
    batch = _batch(model, CONVS)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in (tmp_path / "m").rglob("*"))


def test_lora_model_saves_merged_and_reloads_identically(tiny_vlm, tmp_path):
    model = tiny_vlm("clip", "mlp2x_gelu")
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero; perturb the adapters so merging matters
        for name, p in model.llm.named_parameters():
            if "lora_" in name:
                p.add_(0.5 * torch.randn_like(p))
    batch = _batch(model, CONVS)
    before = _logits(model, batch)
    with torch.no_grad():
        model.llm.disable_adapter_layers()
        plain = _logits(model, batch)
        model.llm.enable_adapter_layers()
    assert (before - plain).abs().max() > 0.1  # the adapters change the outputs
    save_vlm(model, tmp_path / "m")
    assert hasattr(model.llm, "peft_config")  # saving leaves the training model wrapped
    loaded = load_vlm(tmp_path / "m")
    assert not hasattr(loaded.llm, "peft_config")
    assert not any("lora" in k for k in loaded.llm.state_dict())
    # merged weights W + BA round differently from W x + B(A x): equal up to float32 noise
    torch.testing.assert_close(_logits(loaded, batch), before, rtol=1e-4, atol=1e-3)
    with torch.no_grad():
        torch.testing.assert_close(loaded.loss_sum(**batch), model.loss_sum(**batch), rtol=1e-4, atol=1e-3)


def test_llm_embeddings_grow_for_the_image_token(tmp_path, smollm2_tokenizer, tiny_model_config):
    """An LLM whose vocabulary lacks `<image>` gets one more embedding row on load."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vistune.model.llm import smollm2_dir

    raw = AutoTokenizer.from_pretrained(smollm2_dir())
    assert "<image>" not in raw.get_vocab()
    config = LlamaConfig(vocab_size=len(raw), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llm")
    raw.save_pretrained(tmp_path / "llm")
    cfg = tiny_model_config("clip", "linear")
    cfg.llm.name_or_path = str(tmp_path / "llm")
    model = build_vlm(cfg)
    assert model.llm.get_input_embeddings().num_embeddings == len(raw) + 1 == len(model.tokenizer)
    assert model.image_token_id == len(raw)
    loss = model(**_batch(model, CONVS))
    assert torch.isfinite(loss)


def test_load_vlm_rejects_a_plain_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a vistune model dir"):
        load_vlm(tmp_path)


def test_lora_layers_adapts_only_the_top_layers(tiny_vlm):
    from vistune.config import Stage
    from vistune.train.trainable import set_trainable
    from vistune.train.vlm import add_lora

    model = tiny_vlm()
    total = model.llm.config.num_hidden_layers
    add_lora(model, Stage(name="s", train=["lora"], lora_layers=1))
    lora = [p for n, p in model.llm.named_parameters() if "lora_" in n]
    set_trainable(model, {"lora": lora}, Stage(name="s", train=["lora"]))
    trained = {n for n, p in model.llm.named_parameters() if p.requires_grad}
    assert trained and all(f"layers.{total - 1}." in n and "lora_" in n for n in trained)
    with pytest.raises(ValueError, match="lora_layers must be 1"):
        add_lora(tiny_vlm(), Stage(name="s", train=["lora"], lora_layers=total + 1))


def test_object_words_model_trains_and_round_trips(frozen_llm, tiny_model_config, tmp_path):
    cfg = tiny_model_config("clip", "object_words")
    cfg.projector.options = {"words": [["small", "large"], ["red", "blue"]], "slots": 3}
    torch.manual_seed(0)
    model = VLM(cfg, build_vision_tower(cfg.vision), *frozen_llm)
    assert model.image_tokens == 3 * 4  # per object: size, colour, x digit, y digit
    batch = _batch(model, CONVS)
    model.train()
    loss = model(**batch)
    loss.backward()
    assert torch.isfinite(loss) and model.projector.classifiers[0].weight.grad.abs().sum() > 0
    save_vlm(model.eval(), tmp_path / "m")
    back = load_vlm(tmp_path / "m")
    with torch.no_grad():
        assert back.projector.read(back.vision(batch["pixel_values"])) == model.projector.read(
            model.vision(batch["pixel_values"])
        )
