"""What a run's model starts as: composed from its parts, or a trained model to go on from.

`model.from_pretrained` names a trained model: a vistune model dir (`OUT/model` of an earlier run,
recognised by its `vistune.json`) or a transformers LLaVA directory. A finished tower stage need not be
trained again to change a later stage: start the next run from its model dir.
"""

from __future__ import annotations

from typing import Any

from vistune.config import ModelConfig
from vistune.interop.llava import load_llava, model_config_from_llava
from vistune.model.vlm import VLM, build_vlm, is_model_dir, load_vlm, read_model_meta


def start_model(cfg: ModelConfig) -> VLM:
    """The model a run trains: fresh from `cfg`'s parts, or the trained model `cfg.from_pretrained` names."""
    source, template = cfg.from_pretrained, cfg.llm.chat_template
    if not source:
        return build_vlm(cfg)
    if is_model_dir(source):
        return load_vlm(source, "cpu", template).train()  # fp32 weights to train, as build_vlm gives
    return load_llava(source, template)


def start_config(cfg: ModelConfig) -> tuple[ModelConfig, dict[str, Any] | None]:
    """The parts a run's model is made of (and its saved tower architecture), without loading weights."""
    source = cfg.from_pretrained
    if not source:
        return cfg, None
    model_cfg, arch = read_model_meta(source) if is_model_dir(source) else model_config_from_llava(source)
    model_cfg.llm.chat_template = cfg.llm.chat_template or model_cfg.llm.chat_template
    return model_cfg, arch
