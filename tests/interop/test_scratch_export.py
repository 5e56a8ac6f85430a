"""A VLM on vistune's own decoder exports to the transformers LLaVA format as a Llama (the parity check
passes and transformers alone loads it); a layout Llama cannot hold is refused by name."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_vision
from transformers import LlavaForConditionalGeneration

from vistune.config import LLMConfig, ModelConfig, ProjectorConfig
from vistune.interop.export import TOLERANCE, export_llava
from vistune.model.vlm import build_vlm, save_vlm

DECODER = {"model_type": "vistune_scratch", "hidden_size": 32, "intermediate_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "initializer_range": 0.3}  # fmt: skip


def scratch_vlm(tiny_llm_dir, **fields):
    torch.manual_seed(3)
    llm = LLMConfig(name_or_path=str(tiny_llm_dir), chat_template="chatml", from_config=DECODER | fields)
    return build_vlm(ModelConfig(vision=tiny_vision("clip"), projector=ProjectorConfig(), llm=llm)).eval()


def test_scratch_decoder_exports_as_llama(tiny_llm_dir, tmp_path):
    save_vlm(scratch_vlm(tiny_llm_dir), tmp_path / "model")
    parity = export_llava(tmp_path / "model", tmp_path / "hf")
    assert parity is not None and parity.ok(TOLERANCE)
    hf = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf")
    assert hf.config.text_config.model_type == "llama"


def test_learned_positions_do_not_export(tiny_llm_dir, tmp_path):
    save_vlm(scratch_vlm(tiny_llm_dir, positions="learned"), tmp_path / "model")
    with pytest.raises(ValueError, match="no Llama equivalent"):
        export_llava(tmp_path / "model", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
