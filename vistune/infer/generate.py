"""Batched generation for (images, conversation) pairs: greedy or sampled, streamed, with a KV cache.

Prompts are rendered by the same `chat.render` used in training, left-padded, embedded with the image
features merged in, and handed to transformers' `generate` (which keeps the KV cache and applies
temperature/top-p). With a `PrefixCache` (`vistune.infer.prefix`), a conversation that extends one
generated before reuses its keys and values and computes only its new tokens. The same class serves a
plain LLM for text-only use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteriaList,
    TextStreamer,
)
from transformers.generation.streamers import BaseStreamer

from vistune.data.records import Turn
from vistune.infer.prefix import ImageTokens, PrefixCache, image_key, supports_reuse
from vistune.model.llm import load_llm, load_tokenizer, pick_dtype
from vistune.model.template import render
from vistune.model.vlm import MODEL_FILE, VLM, load_vlm


class Generator:
    """Answers conversations about images with a VLM (or text-only with a plain LLM)."""

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        vlm: VLM | None = None,
        batch_size: int = 8,
    ):
        self.llm, self.tokenizer, self.vlm, self.batch_size = llm, tokenizer, vlm, batch_size
        self.device = next(llm.parameters()).device
        eos = llm.generation_config.eos_token_id
        eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
        self.eos = sorted({*eos, tokenizer.eos_token_id} - {None})
        self.image_tokens = ImageTokens(vlm.image_token_id, vlm.image_tokens) if vlm else ImageTokens()

    def prefix_cache(self, max_bytes: int) -> PrefixCache | None:
        """A `PrefixCache` of at most `max_bytes` for this model; None when 0 or the model cannot reuse
        prefixes (a sliding-window layer keeps too little of the past)."""
        if max_bytes <= 0 or not supports_reuse(self.llm.config):
            return None
        return PrefixCache(max_bytes, self.llm.config, self.image_tokens)

    @torch.no_grad()
    def generate(
        self,
        conversations: Sequence[list[Turn]],
        images: Sequence[list[Image.Image]] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer: TextStreamer | None = None,
        *,
        prefixes: PrefixCache | None = None,
        image_keys: Sequence[Sequence[str]] | None = None,
    ) -> list[str]:
        """Continue each conversation (ending with a user turn) with the assistant's reply.

        `temperature` 0 is greedy decoding; streaming needs a batch of one. With `prefixes`, each
        conversation reuses the longest verified prefix held there (the same token ids about the same
        images, computed by an earlier call) and computes only the rest; each conversation, answer
        included, then goes back into `prefixes` for its next turn. `image_keys` name the images'
        content (`image_key`; computed here when not given).
        """
        images = images or [[] for _ in conversations]
        if len(images) != len(conversations):
            raise ValueError(f"{len(conversations)} conversations but {len(images)} image lists")
        if prefixes is not None and image_keys is None:
            image_keys = [[image_key(im) for im in row] for row in images]
        out: list[str] = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            keys = image_keys[chunk] if image_keys is not None else None
            out += self._batch(
                conversations[chunk], images[chunk], max_new_tokens, temperature, top_p, streamer,
                prefixes, keys,
            )  # fmt: skip
        return out

    def answer(
        self, conversations: list[list[Turn]], images: list[list[Image.Image]], max_new_tokens: int = 32
    ) -> list[str]:
        """Greedy answers (the evaluation `Predictor` interface)."""
        return self.generate(conversations, images, max_new_tokens=max_new_tokens)

    def _batch(
        self, convs, images, max_new_tokens, temperature, top_p, streamer, prefixes, image_keys
    ) -> list[str]:
        if not self.vlm and any(images):
            raise ValueError("this model is a plain LLM: it cannot take images")
        ids = [self.prompt_ids(c, len(im)) for c, im in zip(convs, images, strict=True)]
        plan = prefixes.plan(ids, image_keys) if prefixes is not None else None
        skip = plan.images_reused if plan else [0] * len(ids)
        flat = [im for row, reused in zip(images, skip, strict=True) for im in row[reused:]]  # new ones only
        features = self.encode_images(flat) if flat else None
        output = self.generate_ids(
            ids, features, max_new_tokens, temperature=temperature, top_p=top_p, streamer=streamer,
            cache=plan.cache if plan else None,
        )  # fmt: skip
        if plan:
            prefixes.remember(plan, ids, image_keys, [self._until_eos(row) for row in output.tolist()])
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in output]

    def _until_eos(self, row: list[int]) -> list[int]:
        """A row of `generate`'s output up to and including its first end token (the rest is padding)."""
        ends = [k for k, token in enumerate(row) if token in self.eos]
        return row[: ends[0] + 1] if ends else row

    def prompt_ids(
        self, conversation: list[Turn], num_images: int, tokenizer: PreTrainedTokenizerBase | None = None
    ) -> list[int]:
        """The prompt's token ids (image tokens expanded, assistant header appended); `tokenizer`: a copy
        of the model's to render with (another thread may be using the model's own)."""
        image_tokens = self.vlm.image_tokens if self.vlm else 0
        return render(
            conversation, tokenizer or self.tokenizer, image_tokens=image_tokens, num_images=num_images,
            generation=True,
        ).input_ids  # fmt: skip

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B_img, N, D_vision) tower features of the images: what `VLM.embed` takes as `vision_features`."""
        if not self.vlm:
            raise ValueError("this model is a plain LLM: it cannot take images")
        return self.vlm.vision(self.vlm.vision.preprocess(list(images)).to(self.device))

    @torch.no_grad()
    def generate_ids(
        self,
        prompts: Sequence[list[int]],
        features: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        streamer: BaseStreamer | None = None,
        logits_processor: LogitsProcessorList | None = None,
        stopping_criteria: StoppingCriteriaList | None = None,
        cache: DynamicCache | None = None,
    ) -> torch.Tensor:
        """One batch: left-pad the prompts, merge the image features, continue; (B, T) new token ids.

        `features` (B_img, N, D_vision) are the images' tower features in the order their image tokens
        appear across the batch (`encode_images`, or a cache of it). Rows that finish early are padded.
        `cache`, a `DynamicCache` of the batch, already holds the keys and values of the first
        `cache.get_seq_length()` columns of the left-padded prompts (a reused prefix, `PrefixCache.plan`;
        empty to get them back): only the later columns are embedded and computed, so `features` are
        then those of the images whose tokens lie there; `generate` extends the cache in place.
        """
        width = max(map(len, prompts))
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in prompts], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in prompts], device=self.device)
        start = cache.get_seq_length() if cache is not None else 0
        if start >= width:
            raise ValueError(f"the cache holds {start} of {width} prompt columns: the last must be computed")
        if self.vlm:
            embeds = self.vlm.embed(input_ids[:, start:], vision_features=features)
        else:
            embeds = self.llm.get_input_embeddings()(input_ids[:, start:])
        if start:  # `generate` takes the full width and feeds only the columns the cache lacks
            embeds = torch.cat([embeds.new_zeros(len(prompts), start, embeds.shape[-1]), embeds], dim=1)
        sample = temperature > 0
        reuse = {"cache": cache} if cache is not None else {}
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
            pad_token_id=pad, eos_token_id=self.eos, streamer=streamer, logits_processor=logits_processor,
            stopping_criteria=stopping_criteria, **reuse,
        )  # fmt: skip


def load_generator(name_or_dir: str, batch_size: int = 8, device: str | None = None) -> Generator:
    """A trained vistune model dir, or any causal LM (hub id, local dir, or `smollm2`) for text only."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if (Path(name_or_dir) / MODEL_FILE).is_file():
        vlm = load_vlm(name_or_dir, device)
        return Generator(vlm.llm, vlm.tokenizer, vlm, batch_size)
    tokenizer = load_tokenizer(name_or_dir)
    llm = load_llm(name_or_dir, tokenizer, pick_dtype("auto", device)).to(device).eval()
    return Generator(llm, tokenizer, None, batch_size)
