"""The transformers LLaVA format: a vistune model as `LlavaForConditionalGeneration` + processor, and back.

What maps: CLIP or SigLIP towers (pretrained or from scratch) with the `linear` or `mlp2x_gelu`
projector, and any causal LLM transformers can build from its config. The weights map name for name:

    vision.model.*   -> model.vision_tower.*            (the same CLIPVisionModel / SiglipVisionModel)
    projector        -> model.multi_modal_projector.linear_1, act, linear_2
    llm.model.*      -> model.language_model.*          (the LLM's base model)
    llm.lm_head.*    -> lm_head.*

`mlp2x_gelu` is LLaVA's own projector; `linear` becomes linear_1, the identity activation (`linear`)
and an identity linear_2, which computes the same numbers. The tower's feature layer becomes
`vision_feature_layer`; CLIP without its CLS token is the `default` select strategy, everything else
`full`. The image processor reproduces `vision.preprocess` (pad, crop, squash) with the tower's mean and
std; the processor's chat template is the tokenizer's behind a preamble that turns content lists
(`{"type": "image"}`, `{"type": "text"}`) into vistune's `<image>\\n` + text.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaProcessor,
)

from vistune.config import LLMConfig, ModelConfig, ProjectorConfig, VisionConfig
from vistune.data.records import IMAGE_PLACEHOLDER
from vistune.model.llm import image_token_id, load_tokenizer
from vistune.model.vision import VisionTower, build_vision_tower
from vistune.model.vlm import VLM

TOWERS = ("clip", "siglip")
PROJECTORS = {"mlp2x_gelu": "gelu", "linear": "linear"}  # vistune projector -> LLaVA projector activation
VISION_TYPES = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
# Content lists (OpenAI / transformers style) -> the string contents vistune trains on.
CONTENT_PREAMBLE = (
    "{%- set ns = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set parts = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set parts.text = parts.text + '" + IMAGE_PLACEHOLDER + "\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = parts.text -%}{%- endif -%}"
    "{%- set ns.messages = ns.messages + [{'role': message['role'], 'content': text}] -%}"
    "{%- endfor -%}{%- set messages = ns.messages -%}"
)


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, naming what exports, a model the LLaVA format cannot express."""
    problems = []
    if cfg.vision.kind not in TOWERS:
        problems.append(f"vision tower {cfg.vision.kind!r}")
    if cfg.projector.name not in PROJECTORS:
        problems.append(f"projector {cfg.projector.name!r}")
    if cfg.projector.position_codes:
        # LLaVA's projector reads the tower's features alone; codes appended to them have no place there
        codes = cfg.projector.position_codes
        problems.append(f"projector with position codes (projector.position_codes: {codes})")
    if problems:
        raise ValueError(
            f"the transformers LLaVA format cannot hold a {' and a '.join(problems)}; it exports "
            f"{' or '.join(TOWERS)} towers with a {' or '.join(PROJECTORS)} projector"
            + (
                " (pixel_shuffle is Idefics3/SmolVLM's connector, but theirs has no bias and "
                "vistune's does, so it does not export either)"
                if cfg.projector.name == "pixel_shuffle"
                else ""
            )
        )


def _select_strategy(vision: VisionTower) -> str:
    """LLaVA's `default` drops the first (CLS) token; `full` keeps every token."""
    return "default" if vision.config.kind == "clip" and not vision.config.use_cls else "full"


def llava_config(model: VLM) -> LlavaConfig:
    """The LlavaConfig of a vistune model (vision and text configs, image token, feature selection)."""
    check_exportable(model.cfg)
    return LlavaConfig(
        vision_config=model.vision.model.config.to_dict(),
        text_config=model.llm.config.to_dict(),
        image_token_index=model.image_token_id,
        image_seq_length=model.image_tokens,
        projector_hidden_act=PROJECTORS[model.cfg.projector.name],
        vision_feature_select_strategy=_select_strategy(model.vision),
        vision_feature_layer=model.vision.config.feature_layer,
        multimodal_projector_bias=True,
    )


def _projector_state(model: VLM) -> dict[str, torch.Tensor]:
    """linear_1 / linear_2 of LLaVA's projector; `linear` gets an identity second layer."""
    state = model.projector.state_dict()
    if model.cfg.projector.name == "mlp2x_gelu":
        names = {"net.0.weight": "linear_1.weight", "net.0.bias": "linear_1.bias",
                 "net.2.weight": "linear_2.weight", "net.2.bias": "linear_2.bias"}  # fmt: skip
        return {names[k]: v for k, v in state.items()}
    weight = state["proj.weight"]
    dim = weight.shape[0]
    identity = torch.eye(dim, dtype=weight.dtype, device=weight.device)
    return {"linear_1.weight": weight, "linear_1.bias": state["proj.bias"],
            "linear_2.weight": identity, "linear_2.bias": torch.zeros(dim, dtype=weight.dtype)}  # fmt: skip


def hf_state(model: VLM) -> dict[str, torch.Tensor]:
    """The vistune model's weights under LlavaForConditionalGeneration's names."""
    prefix = model.llm.base_model_prefix + "."
    state = {f"model.vision_tower.{k}": v for k, v in model.vision.model.state_dict().items()}
    state |= {f"model.multi_modal_projector.{k}": v for k, v in _projector_state(model).items()}
    for key, value in model.llm.state_dict().items():
        name = f"model.language_model.{key[len(prefix) :]}" if key.startswith(prefix) else key
        state[name] = value
    return state


def to_hf_llava(model: VLM) -> LlavaForConditionalGeneration:
    """An equivalent LlavaForConditionalGeneration (fp32, eval mode), every weight loaded strictly."""
    with init_empty_weights():  # parameters on the meta device (no random init), buffers real
        hf = LlavaForConditionalGeneration(llava_config(model))
    state = {k: v.detach().to(torch.float32).cpu() for k, v in hf_state(model).items()}
    hf.load_state_dict(state, strict=True, assign=True)
    hf.tie_weights()
    # Stop where vistune's generator stops: the LLM's own end tokens and the tokenizer's.
    hf.generation_config = copy.deepcopy(model.llm.generation_config)
    eos = hf.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    hf.generation_config.eos_token_id = sorted({*eos, model.tokenizer.eos_token_id} - {None})
    hf.generation_config.pad_token_id = model.tokenizer.pad_token_id
    return hf.float().eval()


def image_processor(vision: VisionTower) -> LlavaImageProcessorPil:
    """transformers' LLaVA image processor set up to reproduce `vision.preprocess` exactly: its Pillow
    backend (the default backend needs torchvision, which cannot import beside the pinned CPU torch,
    and warns on every import when it falls back)."""
    size, mode = vision.image_size, vision.config.preprocess
    common = dict(image_mean=list(vision.mean), image_std=list(vision.std), resample=3, do_convert_rgb=True)
    if mode == "squash":
        return LlavaImageProcessorPil(
            do_pad=False, size={"height": size, "width": size}, do_center_crop=False, **common
        )
    return LlavaImageProcessorPil(
        do_pad=mode == "pad",
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        **common,
    )


def processor_chat_template(tokenizer_template: str) -> str:
    """The tokenizer's chat template, taking content lists as well as strings."""
    return CONTENT_PREAMBLE + tokenizer_template


def to_hf_processor(model: VLM) -> LlavaProcessor:
    """A LlavaProcessor that turns (images, conversation) into what the exported model expects."""
    vision = model.vision
    return LlavaProcessor(
        image_processor=image_processor(vision),
        tokenizer=model.tokenizer,
        patch_size=vision.model.config.patch_size,
        vision_feature_select_strategy=_select_strategy(vision),
        chat_template=processor_chat_template(model.tokenizer.chat_template),
        image_token=IMAGE_PLACEHOLDER,
        num_additional_image_tokens=1 if vision.config.kind == "clip" else 0,
    )


def _preprocess_mode(processor_config: dict) -> str:
    """The vistune preprocess mode a LLaVA image processor config performs."""
    if processor_config.get("do_pad"):
        return "pad"
    if processor_config.get("do_center_crop") and "shortest_edge" in processor_config.get("size", {}):
        return "crop"
    if not processor_config.get("do_center_crop") and "height" in processor_config.get("size", {}):
        return "squash"
    raise ValueError(f"image processor {processor_config}: not one of vistune's preprocess modes")


def model_config_from_llava(path: str | Path) -> tuple[ModelConfig, dict]:
    """vistune's ModelConfig for a transformers LLaVA directory, and its tower architecture."""
    path = Path(path)
    try:
        model_type = LlavaConfig.get_config_dict(path)[0].get("model_type")
        config = LlavaConfig.from_pretrained(path)
    except (OSError, ValueError) as err:  # no such dir, no config.json, or a hub id while offline
        raise FileNotFoundError(f"{path}: cannot read a transformers LLaVA config ({err})") from err
    if model_type != "llava":
        raise ValueError(f"{path}: not a transformers LLaVA model (model_type {model_type!r}, not 'llava')")
    vision = config.vision_config
    kind = VISION_TYPES.get(vision.model_type)
    if kind is None or not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            f"{path}: vistune reads LLaVA models with a CLIP or SigLIP tower and one feature layer; this one "
            f"has {vision.model_type!r} and vision_feature_layer {config.vision_feature_layer!r}"
        )
    projector = {v: k for k, v in PROJECTORS.items()}.get(config.projector_hidden_act)
    if projector is None or not config.multimodal_projector_bias:
        raise ValueError(
            f"{path}: projector {config.projector_hidden_act!r} (bias {config.multimodal_projector_bias})"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(path).to_dict()
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{path}: cannot read the LLaVA image processor ({err})") from err
    cfg = ModelConfig(
        vision=VisionConfig(
            kind=kind, image_size=vision.image_size, patch_size=vision.patch_size,
            hidden_size=vision.hidden_size, num_layers=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads, intermediate_size=vision.intermediate_size,
            feature_layer=config.vision_feature_layer,
            use_cls=kind == "clip" and config.vision_feature_select_strategy == "full",
            preprocess=_preprocess_mode(processor),
        ),
        projector=ProjectorConfig(name=projector),
        llm=LLMConfig(name_or_path=str(path)),
    )  # fmt: skip
    arch = {"kind": kind, "hf_config": vision.to_dict(), "image_size": vision.image_size,
            "mean": list(processor["image_mean"]), "std": list(processor["image_std"])}  # fmt: skip
    return cfg, arch


def _projector_from_hf(hf_projector: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """vistune projector weights from LLaVA's linear_1 / act / linear_2."""
    state = hf_projector.state_dict()
    if name == "mlp2x_gelu":
        names = {"linear_1.weight": "net.0.weight", "linear_1.bias": "net.0.bias",
                 "linear_2.weight": "net.2.weight", "linear_2.bias": "net.2.bias"}  # fmt: skip
        return {names[k]: v for k, v in state.items()}
    second = state["linear_2.weight"]
    if not (
        torch.equal(second, torch.eye(len(second), dtype=second.dtype)) and not state["linear_2.bias"].any()
    ):
        raise ValueError("projector: a `linear` activation with a second layer that is not the identity")
    return {"proj.weight": state["linear_1.weight"], "proj.bias": state["linear_1.bias"]}


def load_llava(path: str | Path, chat_template: str | None = None) -> VLM:
    """A vistune model from a transformers LLaVA directory: the same tower, projector and LLM weights,
    so it computes the same logits. `chat_template` overrides the tokenizer's (which LLaVA dirs may lack)."""
    path = Path(path)
    cfg, arch = model_config_from_llava(path)
    cfg.llm.chat_template = chat_template
    tokenizer = load_tokenizer(str(path), chat_template)
    hf = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    if image_token_id(tokenizer) != hf.config.image_token_index:
        raise ValueError(
            f"{path}: the tokenizer's {IMAGE_PLACEHOLDER} is id {image_token_id(tokenizer)}, "
            f"the model's image token is {hf.config.image_token_index}"
        )
    tower = build_vision_tower(cfg.vision, arch)
    tower.model.load_state_dict(hf.model.vision_tower.state_dict())
    with init_empty_weights():
        llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(**hf.config.text_config.to_dict()))
    setattr(llm, llm.base_model_prefix, hf.model.language_model)
    llm.set_output_embeddings(hf.lm_head)
    llm.generation_config = hf.generation_config
    model = VLM(cfg, tower, llm, tokenizer)
    model.projector.load_state_dict(_projector_from_hf(hf.model.multi_modal_projector, cfg.projector.name))
    return model.eval()
