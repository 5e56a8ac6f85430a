"""The transformers LLaVA format: exports load in transformers and compute vistune's logits, imports the
same the other way, round trips keep every tensor, and what cannot be expressed is refused."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from vistune.infer.generate import Generator
from vistune.interop.export import export_llava, main_export
from vistune.interop.llava import load_llava, to_hf_llava, to_hf_processor
from vistune.interop.parity import Parity, as_turns, probe_conversations, probe_images
from vistune.model.template import render
from vistune.model.vlm import load_vlm, save_vlm

COVERED = [("clip", "mlp2x_gelu"), ("clip", "linear"), ("siglip", "mlp2x_gelu"), ("siglip", "linear")]


@pytest.fixture(scope="module")
def exported(tiny_vlm, tmp_path_factory):
    """Factory: (vistune model, its export loaded back by transformers alone) per tower and projector."""
    made = {}

    def make(kind: str, projector: str, use_cls: bool = False):
        key = (kind, projector, use_cls)
        if key not in made:
            root = tmp_path_factory.mktemp(f"export-{kind}-{projector}")
            model = tiny_vlm(kind, projector, seed=5)
            model.vision.config.use_cls = use_cls
            save_vlm(model, root / "model")
            export_llava(root / "model", root / "hf")
            hf = LlavaForConditionalGeneration.from_pretrained(root / "hf").eval()
            made[key] = (load_vlm(root / "model"), hf, AutoProcessor.from_pretrained(root / "hf"), root)
        return made[key]

    return make


def _padded_batch(processor, conversations):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c, _ in conversations]
    images = [im for _, ims in conversations for im in ims]
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


@pytest.mark.parametrize("kind, projector", COVERED)
def test_export_gives_vistune_logits_on_a_padded_batch(exported, kind, projector):
    model, hf, processor, _ = exported(kind, projector)
    one, two, _ = probe_conversations()  # one image; an image in each of two user turns
    batch = _padded_batch(processor, [one, two])
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        theirs = hf(**batch).logits
        pixels = model.vision.preprocess(one[1] + two[1])
        embeds = model.embed(batch["input_ids"], pixels)
        ours = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, projector", COVERED)
def test_export_generates_vistune_greedy_answers(exported, kind, projector):
    model, hf, processor, _ = exported(kind, projector)
    generator = Generator(model.llm, model.tokenizer, model, batch_size=1)
    for conversation, images in probe_conversations():
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(text=text, images=images or None, return_tensors="pt")
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
        theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
        assert theirs == generator.generate([as_turns(conversation)], [images], max_new_tokens=6)[0]


def test_exported_chat_template_gives_vistune_ids_on_a_multi_turn_conversation(exported):
    model, _, processor, _ = exported("clip", "mlp2x_gelu")
    image, text = {"type": "image"}, lambda t: {"type": "text", "text": t}
    conversation = [
        {"role": "system", "content": [text("You answer briefly.")]},
        {"role": "user", "content": [image, text("How many shapes?")]},
        {"role": "assistant", "content": [text("Two.")]},
        {"role": "user", "content": [text("And the colours?")]},
        {"role": "assistant", "content": [text("Red and blue.")]},
    ]
    rendered = processor.apply_chat_template(conversation)
    ids = processor(text=rendered, images=probe_images()[:1], return_tensors="pt")["input_ids"][0].tolist()
    ours = render(as_turns(conversation), model.tokenizer, image_tokens=model.image_tokens, num_images=1)
    assert ids == ours.input_ids


def test_clip_with_its_cls_token_exports_as_the_full_strategy(exported):
    model, hf, processor, _ = exported("clip", "mlp2x_gelu", use_cls=True)
    assert hf.config.vision_feature_select_strategy == "full" and model.image_tokens == 17
    conversation, images = probe_conversations()[0]
    inputs = processor(text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                       images=images, return_tensors="pt")  # fmt: skip
    assert int((inputs["input_ids"] == hf.config.image_token_index).sum()) == 17


def test_export_writes_a_model_card_shards_and_the_asked_dtype(exported, tmp_path):
    _, _, _, root = exported("siglip", "mlp2x_gelu")
    card = (root / "hf" / "README.md").read_text()
    assert "pipeline_tag: image-text-to-text" in card and "largest logit difference 0" in card
    parity = export_llava(root / "model", tmp_path / "bf16", dtype="bf16", max_shard_size="100KB")
    assert parity.ok(1e-4)
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all(t.dtype == torch.bfloat16 for s in shards for t in load_file(tmp_path / "bf16" / s).values())
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "bf16")


def test_export_refuses_a_failed_check_and_an_occupied_out(exported, tmp_path, monkeypatch):
    _, _, _, root = exported("clip", "linear")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export_llava(root / "model", tmp_path / "busy")
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    import vistune.interop.export as export

    monkeypatch.setattr(export, "check_parity", lambda *a: Parity(max_logit_diff=0.5))
    with pytest.raises(ValueError, match="does not compute what vistune does"):
        export_llava(root / "model", tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".bad*"))
    assert export_llava(root / "model", tmp_path / "unchecked", check=False) is None


@pytest.mark.parametrize(
    "kind, projector, named",
    [("resnet", "mlp2x_gelu", "vision tower 'resnet'"), ("clip", "resampler", "projector 'resampler'"),
     ("siglip", "pixel_shuffle", "Idefics3")],
)  # fmt: skip
def test_what_the_format_cannot_hold_is_refused(tiny_vlm, tmp_path, kind, projector, named):
    save_vlm(tiny_vlm(kind, projector), tmp_path / "model")
    with pytest.raises(ValueError, match=named) as err:
        export_llava(tmp_path / "model", tmp_path / "hf")
    assert "clip or siglip towers with a mlp2x_gelu or linear projector" in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_cli_exports(exported, tmp_path, capsys):
    _, _, _, root = exported("clip", "mlp2x_gelu")
    assert main_export([str(root / "model"), "--out", str(tmp_path / "cli")]) == 0
    assert "largest logit difference" in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="not a vistune model dir"):
        main_export([str(tmp_path), "--out", str(tmp_path / "x")])


@pytest.mark.parametrize("kind, projector", [("clip", "mlp2x_gelu"), ("siglip", "linear")])
def test_import_computes_the_llava_logits_and_round_trips(exported, tmp_path, kind, projector):
    _, hf, processor, root = exported(kind, projector)
    imported = load_llava(root / "hf")
    conversation, images = probe_conversations()[1]
    inputs = processor(text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                       images=images, return_tensors="pt")  # fmt: skip
    ids = render(as_turns(conversation), imported.tokenizer, image_tokens=imported.image_tokens,
                 num_images=len(images), generation=True).input_ids  # fmt: skip
    assert ids == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ours = imported.llm(
            inputs_embeds=imported.embed(torch.tensor([ids]), imported.vision.preprocess(images))
        )
        torch.testing.assert_close(ours.logits, hf(**inputs).logits, rtol=0, atol=1e-5)
    again = to_hf_llava(imported).state_dict()
    original = hf.state_dict()
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)


def test_processor_reproduces_vistune_preprocessing(exported):
    model, _, processor, _ = exported("siglip", "mlp2x_gelu")
    images = probe_images() + [Image.new("RGB", (9, 31), (10, 200, 30))]
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(pixels, model.vision.preprocess(images), rtol=0, atol=1e-6)
    assert to_hf_processor(model).tokenizer is model.tokenizer


def test_a_run_starts_from_a_llava_dir_trains_and_exports_back(exported, tmp_path, tiny_llm_dir):
    from vistune.commands.train import train
    from vistune.config import config_from_dict

    _, _, _, root = exported("clip", "mlp2x_gelu")
    image = tmp_path / "images" / "a.png"
    image.parent.mkdir()
    probe_images()[0].save(image)
    records = [{"id": f"r{i}", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is here?"}, {"from": "gpt", "value": "Shapes."}]}
        for i in range(4)]  # fmt: skip
    (tmp_path / "data.json").write_text(json.dumps(records))
    data = [{"path": str(tmp_path / "data.json"), "image_root": str(tmp_path / "images")}]
    stage = {"name": "instruct", "train": ["lora"], "lora_rank": 4, "max_steps": 2, "batch_size": 2,
             "lr": 0.01, "data": data}  # fmt: skip
    cfg = config_from_dict({"out": str(tmp_path / "run"), "model": {"from_pretrained": str(root / "hf")},
                            "stages": [stage]})  # fmt: skip
    model_dir = train(cfg)
    trained = load_vlm(model_dir)
    assert trained.cfg.from_pretrained is None and trained.cfg.vision.kind == "clip"
    parity = export_llava(model_dir, tmp_path / "back")
    assert parity.ok(1e-4)
    before = load_file(root / "hf" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if "language_model" in k)
    assert any("vision_tower" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)


def test_the_export_needs_no_vistune(exported, tmp_path):
    """A fresh interpreter that cannot import vistune loads the export and answers about an image."""
    _, _, _, root = exported("clip", "mlp2x_gelu")
    probe_images()[0].save(tmp_path / "a.png")
    script = f"""
import sys
sys.modules["vistune"] = None  # any import of vistune now fails
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
model = LlavaForConditionalGeneration.from_pretrained({str(root / "hf")!r})
processor = AutoProcessor.from_pretrained({str(root / "hf")!r})
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What?"}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=text, images=[Image.open({str(tmp_path / "a.png")!r})], return_tensors="pt")
print(model.generate(**inputs, max_new_tokens=3, do_sample=False).shape[1] - inputs["input_ids"].shape[1])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] in {"1", "2", "3"}
