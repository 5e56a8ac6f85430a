"""The vision-language model: vision tower -> projector -> image tokens merged into the LLM's input.

Image features replace the embeddings at `<image>` token positions with one vectorised op
(masked_scatter), after checking that the counts agree. The loss is a *sum* over answer tokens; the
training loop divides by the number of answer tokens in the whole effective batch, so gradient
accumulation and the number of processes do not change what is learned.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils.generic import is_flash_attention_requested

from vistune.config import ModelConfig, config_from_dict
from vistune.model.llm import build_llm, image_token_id, load_llm, load_tokenizer, pick_dtype
from vistune.model.positions import GridPositions
from vistune.model.projector import ProjectorContext, build_projector, upgrade_projector
from vistune.model.template import IGNORE
from vistune.model.vision import VisionTower, build_vision_tower

MODEL_FILE = "vistune.json"
WEIGHTS_FILE = "vision_projector.safetensors"


class VLM(nn.Module):
    """A vision tower, a projector and a causal LLM, with the tokenizer that drives them."""

    def __init__(
        self,
        cfg: ModelConfig,
        vision: VisionTower,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
    ):
        super().__init__()
        self.cfg = cfg
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        embeddings = llm.get_input_embeddings().weight
        codes = cfg.projector.position_codes
        # each token's place in the grid, appended to its features (none: an identity)
        self.positions = GridPositions(vision.grid, codes, vision.num_tokens) if codes else nn.Identity()
        context = ProjectorContext(
            vision.hidden_size + codes, embeddings.shape[1], vision.grid, embeddings, tokenizer
        )
        self.projector = build_projector(cfg.projector, context)
        self.image_token_id = image_token_id(tokenizer)
        self.image_tokens = self.projector.num_tokens(vision.num_tokens)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels -> (B, image_tokens, D_llm) LLM-ready image embeddings."""
        return self.project(self.vision(pixel_values))

    def project(self, vision_features: torch.Tensor) -> torch.Tensor:
        """(B, N, D_vision) tower features -> (B, image_tokens, D_llm), with their places when coded."""
        return self.projector(self.positions(vision_features))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        checked: bool = False,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with image features scattered into the `<image>` positions.

        Pass `pixel_values` (B_img, 3, H, W), or `vision_features` (B_img, N, D_vision) already computed
        by a frozen tower (a cache), or `image_embeds` (B_img, image_tokens, D_llm) already projected,
        for the images in the order their tokens appear. `checked` says the caller has already checked
        the image-token count (training does, where it builds the batch).
        """
        embeds = self.llm.get_input_embeddings()(input_ids)
        mask = input_ids == self.image_token_id
        if image_embeds is None and (pixel_values is not None or vision_features is not None):
            if vision_features is None:
                vision_features = self.vision(pixel_values)
            image_embeds = self.project(vision_features)
        if image_embeds is None:
            if not checked:
                check_image_tokens(mask, 0, 0)
            return embeds
        features = image_embeds.to(embeds.dtype)
        if not checked:
            check_image_tokens(mask, features.shape[0], features.shape[1])
        return embeds.masked_scatter(mask.unsqueeze(-1), features.reshape(-1, features.shape[-1]))

    def loss_sum(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed next-token cross-entropy over labelled positions (logits only where labels are)."""
        positions, ids = answer_targets(labels)
        return self.answer_loss_sum(input_ids, attention_mask, positions, ids, pixel_values, vision_features)

    def answer_loss_sum(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        answer_positions: torch.Tensor,
        answer_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        checked: bool = False,
        position_ids: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`loss_sum` with the targets of `answer_targets`, computed where the batch is built.

        `attention_mask` may be None for right-padded rows: under the causal mask no real token sees
        a pad, and only real tokens carry a loss. `checked`: as in `embed`. `position_ids` (B, L) that
        restart at 0 mark packed rows (several records per row, `collate_packed`); with no attention
        mask transformers then keeps attention inside each record (`find_packed_sequence_indices`).
        `image_embeds`: the images already projected (as in `embed`)."""
        embeds = self.embed(input_ids, pixel_values, vision_features, checked, image_embeds)
        packed = {}
        if position_ids is not None:
            if is_flash_attention_requested(self.llm.config):
                # flash-attention's varlen path finds packed records in a single row only; the answer
                # positions index the flattened (B * L) hidden states, so they hold either way
                embeds, position_ids = embeds.reshape(1, -1, embeds.shape[-1]), position_ids.reshape(1, -1)
            # transformers looks for packed records only without a cache; unpacked rows keep the
            # default, or it would look in its own positions and read that check back to the host
            packed = {"position_ids": position_ids, "use_cache": False}
        decoder = self.llm.get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=attention_mask, **packed).last_hidden_state
        picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, answer_positions)
        logits = self.llm.get_output_embeddings()(picked)
        return F.cross_entropy(logits.float(), answer_ids, reduction="sum")

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """Mean loss per answer token of this batch (for quick use; training uses `loss_sum`)."""
        n = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
        return self.loss_sum(**batch) / n


def answer_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The next-token targets that carry a loss: their flat positions in the (B * L) hidden states
    (position t predicts label t + 1) and their token ids.

    Training computes them where it builds the batch, on the CPU: a boolean index on a GPU reads its
    size back to the host, a stall in every step."""
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE).nonzero(as_tuple=True)
    return rows * labels.shape[1] + cols, targets[rows, cols]


def check_image_tokens(mask: torch.Tensor, images: int, tokens: int) -> None:
    """The `<image>` positions in `mask` must number images x tokens. On a GPU the check runs on the
    device (reading the count back would stall every step) and fails at a later kernel."""
    count = mask.sum()
    if mask.device.type != "cpu":
        torch._assert_async(count == images * tokens, "image tokens and image features do not match")
        return
    n_positions = int(count)
    if images == 0 and n_positions:
        raise ValueError(f"{n_positions} image token(s) in the input but no images were given")
    if n_positions != images * tokens:
        raise ValueError(
            f"image tokens and image features do not match: {n_positions} image-token positions, "
            f"{images} image(s) x {tokens} tokens"
        )


def build_vlm(cfg: ModelConfig, device: str | torch.device = "cpu") -> VLM:
    """Compose a fresh model to train on `device`: pretrained or scratch tower, new projector, the LLM.

    `llm.dtype: auto` gives fp32 weights here, whatever the device: training updates them with AdamW
    (on GPUs the loop runs the matmuls under bf16 autocast)."""
    tokenizer = load_tokenizer(cfg.llm.name_or_path, cfg.llm.chat_template)
    llm = build_llm(cfg.llm, tokenizer, pick_dtype(cfg.llm.dtype, "cpu"))
    return VLM(cfg, build_vision_tower(cfg.vision), llm, tokenizer).to(device)


def save_vlm(model: VLM, out_dir: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write a self-contained model dir: config + tower architecture, tower/projector weights, LLM dir.

    LoRA adapters are merged into the LLM weights first, so the dir loads with plain transformers.
    `state` is the model's full state when its own weights are sharded (FSDP; gathered by
    `vistune.train.checkpoint.gather_state`); by default the weights are read from the model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state is None else state
    llm, llm_state = model.llm, {k[len("llm.") :]: v for k, v in state.items() if k.startswith("llm.")}
    if isinstance(llm, PeftModel):  # save the merged weights, keep training intact
        llm, llm_state = copy.deepcopy(llm).merge_and_unload(), None
    llm.save_pretrained(out / "llm", state_dict=llm_state, safe_serialization=True)
    model.tokenizer.save_pretrained(out / "llm")
    weights = {k: v for k, v in state.items() if k.startswith(("vision.", "projector."))}
    save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, out / WEIGHTS_FILE)
    meta = {"model": dataclasses.asdict(model.cfg), "vision_arch": model.vision.arch()}
    (out / MODEL_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def is_model_dir(path: str | Path) -> bool:
    """Whether `path` is a vistune model dir (written by `save_vlm`)."""
    return (Path(path) / MODEL_FILE).is_file()


def read_model_meta(model_dir: str | Path) -> tuple[ModelConfig, dict]:
    """The ModelConfig of a vistune model dir (its LLM and tokenizer in `DIR/llm`, tower and projector
    weights in the dir) and its saved tower architecture."""
    model_dir = Path(model_dir)
    meta_path = model_dir / MODEL_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a vistune model dir (no {MODEL_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        model_meta, vision_arch = meta["model"], meta["vision_arch"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        why = f"no field {err}" if isinstance(err, KeyError) else str(err)
        raise ValueError(f"{meta_path}: not a vistune model file ({why})") from None
    cfg = config_from_dict({"model": _upgrade(model_meta)}).model
    cfg.vision.name_or_path, cfg.vision.weights = None, None  # weights come from this dir
    cfg.llm.name_or_path, cfg.llm.from_config = str(model_dir / "llm"), None
    cfg.from_pretrained = None  # the model is here now
    return cfg, vision_arch


def load_vlm(
    model_dir: str | Path, device: str | torch.device = "cpu", chat_template: str | None = None
) -> VLM:
    """Load a model dir written by `save_vlm` (offline: the tower is rebuilt from its saved architecture).

    `chat_template` replaces the saved tokenizer's template (`chatml` or a Jinja string)."""
    cfg, vision_arch = read_model_meta(model_dir)
    cfg.llm.chat_template = chat_template or cfg.llm.chat_template
    tokenizer = load_tokenizer(cfg.llm.name_or_path, chat_template)
    llm = load_llm(cfg.llm.name_or_path, tokenizer, pick_dtype(cfg.llm.dtype, device))
    model = VLM(cfg, build_vision_tower(cfg.vision, arch=vision_arch), llm, tokenizer)
    state = load_file(Path(model_dir) / WEIGHTS_FILE)
    for prefix, module in (("vision.", model.vision), ("projector.", model.projector)):
        module.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return model.to(device).eval()


def _upgrade(model: dict) -> dict:
    """A saved model config in today's form: an extension's projector brings its saved settings up to date
    (`upgrade_projector`), and dirs written before `vision.preprocess` existed (they squashed) still load."""
    if isinstance(model.get("projector"), dict):
        model["projector"] = upgrade_projector(model["projector"])
    model.get("vision", {}).setdefault("preprocess", "squash")
    return model
