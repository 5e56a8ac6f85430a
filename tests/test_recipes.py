"""The shipped real-data recipes (configs/llava-1.5.yaml, configs/smolvlm.yaml) and accelerate configs.

Each recipe loads as shipped and, with tiny local stand-ins swapped in through overrides (a random
CLIP/SigLIP tower saved with save_pretrained, the tiny Llama, a few LLaVA-format records at the paths the
recipe expects), trains one step of every stage and leaves a model dir that loads. The tower's
feature_layer, use_cls, preprocess, the projector and the LLaVA-1.5 chat template stay as shipped. The
LLaVA-1.5 template renders LLaVA's `v1` conversation with loss exactly on the answers and their </s>.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import launch_command_parser
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel, SiglipVisionConfig, SiglipVisionModel

from vistune.commands.train import train
from vistune.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig, load_config
from vistune.data.records import Turn
from vistune.model.template import IGNORE, render, set_chat_template
from vistune.model.vlm import build_vlm, load_vlm

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LLAVA = CONFIGS / "llava-1.5.yaml"
SMOLVLM = CONFIGS / "smolvlm.yaml"
# LLaVA's conv_vicuna_v1 system line (llava/conversation.py), what finetune.sh's `--version v1` uses.
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TOWER_CLASSES = {
    "clip": (CLIPVisionConfig, CLIPVisionModel),
    "siglip": (SiglipVisionConfig, SiglipVisionModel),
}
# Tiny stand-ins, 32 px. clip: 8 px patches, a 4x4 grid, 16 image tokens (mlp2x_gelu keeps them all);
# siglip: 4 px patches, an 8x8 grid that the recipe's shuffle factor 4 divides: 2x2 = 4 image tokens.
STAND_INS = {LLAVA.name: ("clip", 8, 16), SMOLVLM.name: ("siglip", 4, 4)}

# LLaVA-Pretrain records as in blip_laion_cc_sbu_558k.json (the placeholder before or after the text).
PRETRAIN = [
    ("004539375", "00453/004539375.jpg", "Render a clear and concise summary of the photo.\n<image>",
     "select luxury furniture 3 - inch gel memory foam mattress topper"),
    ("002239345", "00223/002239345.jpg", "<image>\nWrite a terse but informative summary of the picture.",
     "a grey watercolor painting of a cat"),
    ("001172357", "00117/001172357.jpg", "What is in the photo?\n<image>", "a red bus on a city street"),
]  # fmt: skip
# llava_v1_5_mix665k.json: one record per image folder the mixture draws on, and a text-only one.
INSTRUCT_IMAGES = [
    "coco/train2017/000000033471.jpg",
    "gqa/images/2354786.jpg",
    "ocr_vqa/images/689852649.jpg",
    "textvqa/train_images/011e7e629fb9ae7b.jpg",
    "vg/VG_100K/2356347.jpg",
    "vg/VG_100K_2/1.jpg",
]


def _save_image(path: Path, index: int) -> None:
    """A small non-square JPEG (so `pad` has work to do) with a coloured block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (40 + 8 * index, 24), (200, 190 - 20 * index, 40 * index))
    image.paste((20 * index, 90, 160), (4, 4, 20, 16))
    image.save(path)


def _write_data(root: Path) -> dict[str, int]:
    """The LLaVA download layout the recipes expect under data_root; returns records per file."""
    pretrain = []
    for i, (rid, image, question, caption) in enumerate(PRETRAIN):
        _save_image(root / "LLaVA-Pretrain" / "images" / image, i)
        pretrain.append({"id": rid, "image": image, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": caption}]})  # fmt: skip
    (root / "LLaVA-Pretrain" / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(pretrain))
    instruct = []
    for i, image in enumerate(INSTRUCT_IMAGES):
        _save_image(root / image, i)
        turns = [("human", "<image>\nWhat is in the image?"), ("gpt", f"A coloured block, number {i}.")]
        if i % 2:  # multi-turn, as many mix665k records are
            turns += [
                ("human", "Answer the question using a single word or phrase. What colour?"),
                ("gpt", "Blue"),
            ]
        instruct.append({"id": Path(image).stem, "image": image,
                         "conversations": [{"from": f, "value": v} for f, v in turns]})  # fmt: skip
    instruct.append({"id": "i6IyJda_0", "model": "", "conversations": [  # ShareGPT: no image
        {"from": "human", "value": "Name a prime number."}, {"from": "gpt", "value": "Seven."}]})  # fmt: skip
    (root / "llava_v1_5_mix665k.json").write_text(json.dumps(instruct))
    return {"align": len(pretrain), "instruct": len(instruct)}


def _save_tower(kind: str, patch_size: int, out: Path) -> Path:
    config_cls, model_cls = TOWER_CLASSES[kind]
    config = config_cls(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        image_size=32, patch_size=patch_size)  # fmt: skip
    if kind == "siglip":
        config.vision_use_head = False
    torch.manual_seed(0)
    model_cls(config).save_pretrained(out)
    return out


@pytest.mark.parametrize("recipe", [LLAVA, SMOLVLM], ids=lambda p: p.stem)
def test_recipe_trains_every_stage_with_tiny_stand_ins(recipe, tmp_path, tiny_llm_dir):
    shipped = load_config(recipe)
    kind, patch_size, image_tokens = STAND_INS[recipe.name]
    assert shipped.model.vision.kind == kind and [s.name for s in shipped.stages] == ["align", "instruct"]
    counts = _write_data(tmp_path / "data")
    overrides = [
        f"data_root={tmp_path / 'data'}",
        f"out={tmp_path / 'run'}",
        f"model.vision.name_or_path={_save_tower(kind, patch_size, tmp_path / 'tower')}",
        f"model.llm.name_or_path={tiny_llm_dir}",
    ]
    for i, stage in enumerate(shipped.stages):  # one step over all of the stage's records
        overrides += [f"stages.{i}.batch_size={counts[stage.name]}", f"stages.{i}.grad_accum=1",
                      f"stages.{i}.max_steps=1", f"stages.{i}.max_length=256"]  # fmt: skip
    cfg = load_config(recipe, overrides)
    for name in ("feature_layer", "use_cls", "preprocess"):
        assert getattr(cfg.model.vision, name) == getattr(shipped.model.vision, name)
    assert cfg.model.projector == shipped.model.projector
    assert cfg.model.llm.chat_template == shipped.model.llm.chat_template

    model_dir = train(cfg)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    started = {r["stage"]: r for r in rows if r.get("event") == "stage"}
    losses = {
        s.name: [r["loss"] for r in rows if r.get("stage") == s.name and "loss" in r] for s in cfg.stages
    }
    assert list(started) == ["align", "instruct"]
    for name, count in counts.items():  # every record rendered and kept, the text-only one included
        assert started[name]["records"] == {"kept": count}, name
        assert len(losses[name]) == 1 and math.isfinite(losses[name][0]), (name, losses[name])
    model = load_vlm(model_dir)
    assert model.image_tokens == image_tokens
    assert model.cfg.vision.feature_layer == shipped.model.vision.feature_layer
    if shipped.model.llm.chat_template:  # LLaVA-1.5: the recipe's template travels with the model
        assert model.tokenizer.chat_template == shipped.model.llm.chat_template


@pytest.fixture(scope="module")
def vicuna_tok(smollm2_tokenizer):
    """A copy of the SmolLM2 tokenizer with Vicuna's <s>/</s> as bos/eos and the LLaVA-1.5 template."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    set_chat_template(tok, load_config(LLAVA).model.llm.chat_template)
    return tok


def test_llava_template_renders_vicuna_v1_with_loss_on_the_answers(vicuna_tok):
    tok = vicuna_tok
    turns = [
        Turn("user", "<image>\nWhat is on the table?"),
        Turn("assistant", "A red mug and a laptop."),
        Turn("user", "What colour is the mug?"),
        Turn("assistant", "Red."),
    ]
    out = render(turns, tok, image_tokens=2, num_images=1)
    assert tok.decode(out.input_ids) == (
        f"<s>{VICUNA_SYSTEM} USER: <image><image>\nWhat is on the table? "
        "ASSISTANT: A red mug and a laptop.</s>USER: What colour is the mug? ASSISTANT: Red.</s>"
    )
    runs, run = [], []  # maximal runs of labelled tokens
    for label in [*out.labels, IGNORE]:
        if label != IGNORE:
            run.append(label)
        elif run:
            runs, run = [*runs, run], []
    assert [tok.decode(r) for r in runs] == ["A red mug and a laptop.</s>", "Red.</s>"]
    assert all(r[-1] == tok.eos_token_id for r in runs)  # </s> is one token: the model learns to stop
    # Generation continues after the exact text that precedes every answer in training.
    prompt = render(turns[:3], tok, image_tokens=2, num_images=1, generation=True)
    assert tok.decode(prompt.input_ids).endswith("</s>USER: What colour is the mug? ASSISTANT: ")
    assert prompt.input_ids == out.input_ids[: len(prompt.input_ids)]
    # A record's own system turn replaces the default line.
    system = render([Turn("system", "Be brief."), *turns[:2]], tok, image_tokens=2, num_images=1)
    assert tok.decode(system.input_ids).startswith("<s>Be brief. USER: ")


def test_recipes_keep_the_published_hyper_parameters():
    llava, smol = load_config(LLAVA), load_config(SMOLVLM)
    vision = llava.model.vision
    assert (vision.name_or_path, vision.feature_layer, vision.use_cls, vision.preprocess) == (
        "openai/clip-vit-large-patch14-336", -2, False, "pad")  # fmt: skip
    assert llava.model.projector.name == "mlp2x_gelu"
    assert llava.model.llm.name_or_path == "lmsys/vicuna-7b-v1.5"
    align, instruct = llava.stages
    assert (align.train, align.lr, align.epochs, align.warmup_ratio, align.weight_decay) == (
        ["projector"], 1e-3, 1.0, 0.03, 0.0)  # fmt: skip
    assert (instruct.train, instruct.lr, instruct.epochs, instruct.warmup_ratio, instruct.weight_decay) == (
        ["projector", "llm"], 2e-5, 1.0, 0.03, 0.0)  # fmt: skip
    # Global batches on 8 GPUs: 256 and 128, sequences up to 2048 tokens.
    assert [s.batch_size * s.grad_accum * 8 for s in llava.stages] == [256, 128]
    assert [s.max_length for s in llava.stages] == [2048, 2048]
    assert [Path(s.data[0].path).name for s in llava.stages] == ["blip_laion_cc_sbu_558k.json",
                                                                   "llava_v1_5_mix665k.json"]  # fmt: skip
    # SmolVLM-256M/500M: SigLIP base patch16 at 512 px is a 32x32 grid; ratio 4 leaves 8x8 = 64 tokens.
    vision = smol.model.vision
    assert (vision.kind, vision.name_or_path, vision.feature_layer, vision.preprocess) == (
        "siglip", "google/siglip-base-patch16-512", -1, "pad")  # fmt: skip
    factor = smol.model.projector.shuffle_factor
    assert smol.model.projector.name == "pixel_shuffle" and 512 // 16 % factor == 0
    assert (512 // 16 // factor) ** 2 == 64
    assert smol.model.llm.name_or_path == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert smol.model.llm.chat_template is None  # SmolLM2's own
    assert [s.batch_size * s.grad_accum for s in smol.stages] == [256, 128]  # on one GPU


def test_a_configured_template_serves_a_tokenizer_without_one(tmp_path, tiny_llm_dir):
    """Vicuna v1.5's tokenizer has no chat template; the recipe's llm.chat_template must be enough."""
    bare = Path(shutil.copytree(tiny_llm_dir, tmp_path / "no-template"))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_config(LLAVA).model.llm.chat_template
    model = build_vlm(
        ModelConfig(
            vision=VisionConfig(
                kind="clip",
                image_size=16,
                patch_size=4,
                hidden_size=16,
                num_layers=2,
                num_heads=2,
                intermediate_size=32,
                feature_layer=-2,
            ),  # fmt: skip
            projector=ProjectorConfig(name="mlp2x_gelu"),
            llm=LLMConfig(name_or_path=str(bare), chat_template=template),
        )
    )
    assert model.tokenizer.chat_template == template


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_accelerate_configs_parse_with_known_keys(name):
    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP"}[name]
    assert config.distributed_type.value == expected
    assert (config.num_processes, config.mixed_precision, config.use_cpu) == (8, "bf16", False)
    # `accelerate launch` copies each fsdp_config / deepspeed_config key onto the launch option of that
    # name; a misspelt key would be silently ignored.
    options = {action.dest for action in launch_command_parser()._actions}
    assert set(config.fsdp_config) | set(config.deepspeed_config) <= options
    if name == "fsdp":
        assert config.fsdp_config["fsdp_version"] == 2
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert config.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
