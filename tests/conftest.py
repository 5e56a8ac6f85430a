"""Shared fixtures: the real SmolLM2 tokenizer, a tiny random Llama saved beside it, tiny vision towers.

Everything is offline (HF_HUB_OFFLINE=1) and small enough to build in well under a second, except the
SmolLM2 tokenizer, which `vistune.llm.smollm2_dir()` converts from the embedded GGUF once (~20 s) into
$VISTUNE_CACHE (default ~/.cache/vistune) and reads from there afterwards.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase  # noqa: E402

from vistune.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from vistune.shapes.synth import synthesize  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

# Tiny towers of each kind: 16 px images. clip/siglip: 4x4 patches of 16-d; resnet: a 2x2 map of 16-d.
TOWERS = {
    "clip": dict(kind="clip", image_size=16, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                 intermediate_size=32),
    "siglip": dict(kind="siglip", image_size=16, patch_size=4, hidden_size=16, num_layers=1, num_heads=2,
                   intermediate_size=32),
    "resnet": dict(kind="resnet", image_size=16, resnet_depths=[1, 1], resnet_widths=[8, 16]),
}  # fmt: skip
PROJECTORS = ("linear", "mlp2x_gelu", "pixel_shuffle", "resampler")


def tiny_vision(kind: str = "clip") -> VisionConfig:
    """A fresh VisionConfig of the tiny tower `kind`."""
    return VisionConfig(**copy.deepcopy(TOWERS[kind]))


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2-135M-Instruct tokenizer as vistune loads it (pad set, `<image>` added).

    Session-wide and shared: tests that change it must work on a `copy.deepcopy`.
    """
    from vistune.model.llm import load_tokenizer

    return load_tokenizer("smollm2")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A random 2-layer, width-32 Llama with SmolLM2's tokenizer and chat template, saved as an HF dir."""
    tokenizer = smollm2_tokenizer
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.3,  # large enough that greedy outputs depend on the prompt and images
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-llm")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_config(tiny_llm_dir):
    """Factory: a ModelConfig of a tiny tower `kind` + projector `name` + the tiny LLM."""

    def make(kind: str = "clip", projector: str = "mlp2x_gelu", chat_template: str | None = None):
        return ModelConfig(
            vision=tiny_vision(kind),
            projector=ProjectorConfig(name=projector, num_queries=3),
            llm=LLMConfig(name_or_path=str(tiny_llm_dir), chat_template=chat_template),
        )

    return make


@pytest.fixture(scope="session")
def tiny_vlm(tiny_model_config):
    """Factory: a freshly built tiny VLM (seeded, eval mode) for a tower kind and projector name."""
    from vistune.model.vlm import build_vlm

    def make(kind: str = "clip", projector: str = "mlp2x_gelu", seed: int = 0, **kwargs):
        torch.manual_seed(seed)
        return build_vlm(tiny_model_config(kind, projector, **kwargs)).eval()

    return make


# The training tests' tiny shapes world and one-stage configs on it.
KIND_DATA = {
    "vlm": {"path": "train/conversations.json", "image_root": "images"},
    "scene": {"path": "scenes/train.jsonl", "image_root": "images"},
    "classify": {"path": "imagefolder/train"},
    "contrastive": {"path": "train/pairs.jsonl", "image_root": "images"},
}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """Six training scenes with every file a stage kind reads (ImageFolder included)."""
    root = tmp_path_factory.mktemp("tiny-world") / "data"
    synthesize(root, sizes={"train": 6, "val": 0, "test": 0, "compositional": 0}, workers=1, imagefolder=True)
    return root


@pytest.fixture
def one_stage(tiny_world, tiny_llm_dir) -> Callable[..., dict]:
    """`one_stage(train, kind="vlm", **stage)`: a raw config of one stage of `kind` on the tiny world,
    a tiny CLIP tower, `mlp2x_gelu` and the tiny LLM (also the contrastive text tower)."""

    def make(train: list[str], kind: str = "vlm", **settings) -> dict:
        vision = {"kind": "clip", "image_size": 16, "patch_size": 4, "hidden_size": 16, "num_layers": 1,
                  "num_heads": 2, "intermediate_size": 32}  # fmt: skip
        stage = {"name": "s", "kind": kind, "train": train, "batch_size": 2, "grad_accum": 2, "max_steps": 2,
                 "max_length": 128, "lr": 0.01, "lora_rank": 4, "data": [KIND_DATA[kind]]}  # fmt: skip
        if kind == "contrastive":
            stage |= {"options": {"text_tower": str(tiny_llm_dir), "chunk_size": 2}, "max_length": 32,
                      "grad_accum": 1, "batch_size": 4}  # fmt: skip
        return {
            "data_root": str(tiny_world),
            "model": {
                "vision": vision,
                "projector": {"name": "mlp2x_gelu"},
                "llm": {"name_or_path": str(tiny_llm_dir), "chat_template": "chatml"},
            },
            "stages": [stage | settings],
        }

    return make


@pytest.fixture(scope="module")
def corpus_world(tmp_path_factory, tiny_llm_dir, tiny_vlm):
    """What the bad-input cases of a test file share (tests/bad_inputs.py): tiny saved models."""
    from bad_inputs import World

    return World(tmp_path_factory.mktemp("corpus"), Path(tiny_llm_dir), tiny_vlm)


@pytest.fixture(scope="module")
def corpus_server(corpus_world):
    """The tiny model served on a loopback port for the bad-input cases of the HTTP API."""
    from bad_inputs import serve

    yield from serve(corpus_world)
