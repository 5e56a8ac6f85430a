"""From a checked chat request to a queued job: limits, images, the prompt, and the token budget.

`Engine.prepare` runs in a worker thread (images are decoded there, so the event loop never blocks on
pixels) and raises `APIError` with the offending field for anything over a limit: images per request,
bytes and pixels per image, `max_tokens`, and prompt length (the prompt is never cut silently).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass

from vistune.infer.api import APIError, ChatRequest, ImageRef, check_request, requested_max_tokens, to_turns
from vistune.infer.decoding import ImageItem
from vistune.infer.generate import Generator
from vistune.infer.image_input import ImageLimits, decode_image, image_bytes
from vistune.infer.scheduler import FeatureCache, Scheduler
from vistune.model.template import RenderError

MB = 2**20


@dataclass(frozen=True)
class ServeConfig:
    """Everything `vistune serve` can be told; every limit has a flag of the same name."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 * MB
    max_image_bytes: int = 10 * MB
    max_image_pixels: int = 25_000_000
    max_images: int = 8
    max_tokens: int = 1024
    max_prompt_tokens: int | None = None  # None: the model's context length
    allow_remote_images: bool = False
    fetch_timeout_s: float = 10.0
    max_batch: int = 16
    max_wait_s: float = 0.01
    max_queue: int = 128
    feature_cache_bytes: int = 256 * MB
    prefix_cache_bytes: int = 256 * MB  # conversations' keys and values, reused by follow-ups; 0: off
    prepare_threads: int = 4  # requests whose images are fetched and decoded at the same time

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_tokens",
                     "max_batch", "max_queue", "prepare_threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"serve: max_prompt_tokens must be at least 1, got {self.max_prompt_tokens}")
        if (
            min(self.max_wait_s, self.feature_cache_bytes, self.prefix_cache_bytes) < 0
            or self.fetch_timeout_s <= 0
        ):
            raise ValueError(
                "serve: max_wait_s, feature_cache_bytes and prefix_cache_bytes must be >= 0, "
                "fetch_timeout_s > 0"
            )


@dataclass
class Prepared:
    """What the scheduler needs of a request."""

    prompt: list[int]
    images: list[ImageItem]
    max_tokens: int


class Engine:
    """The served model with its scheduler, feature cache and limits."""

    def __init__(self, generator: Generator, config: ServeConfig):
        self.generator, self.config = generator, config
        self.context: int | None = getattr(generator.llm.config, "max_position_embeddings", None)
        self.cache = FeatureCache(config.feature_cache_bytes)
        self.prefixes = generator.prefix_cache(config.prefix_cache_bytes)
        self.tokenizer_lock = threading.Lock()  # rendering here and decoding in the scheduler share it
        self.scheduler = Scheduler(
            generator, self.cache, config.max_batch, config.max_wait_s, config.max_queue, self.tokenizer_lock,
            self.prefixes,
        )  # fmt: skip
        self.limits = ImageLimits(
            config.max_image_bytes,
            config.max_image_pixels,
            config.allow_remote_images,
            config.fetch_timeout_s,
        )

    @property
    def takes_images(self) -> bool:
        return self.generator.vlm is not None

    def prepare(self, req: ChatRequest) -> Prepared:
        """Check the request against the limits, load its images, render its prompt (in a thread)."""
        check_request(req, self.config.model_name)
        turns, refs = to_turns(req.messages)
        self._check_image_count(refs)
        images = [self._image(ref) for ref in refs]
        try:
            with self.tokenizer_lock:
                prompt = self.generator.prompt_ids(turns, len(refs))
        except RenderError as err:
            raise APIError(400, f"messages: {err}".replace("conversation: ", ""), "messages") from None
        return Prepared(prompt, images, self._max_tokens(req, len(prompt)))

    def _check_image_count(self, refs: list[ImageRef]) -> None:
        if refs and not self.takes_images:
            raise APIError(
                400, f"{self.config.model_name!r} is a text-only language model: it cannot take images",
                refs[0].param, "images_not_supported",
            )  # fmt: skip
        if len(refs) > self.config.max_images:
            limit = self.config.max_images
            message = f"{len(refs)} images in one request, over this server's limit of {limit} (--max-images)"
            raise APIError(400, message, refs[limit].param, "too_many_images")

    def _image(self, ref: ImageRef) -> ImageItem:
        data = image_bytes(ref.url, ref.param, self.limits)
        key = hashlib.sha256(data).hexdigest()
        features = self.cache.get(key)
        if features is not None:  # seen before: neither decoded nor encoded again
            return ImageItem(key, features=features)
        return ImageItem(key, image=decode_image(data, ref.param, self.limits.max_pixels))

    def _max_tokens(self, req: ChatRequest, prompt_tokens: int) -> int:
        """The request's token budget: asked for (at most --max-tokens), or what the context leaves."""
        cap, asked = self.config.max_tokens, requested_max_tokens(req)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if asked is not None and asked > cap:
            raise APIError(400, f"{param}={asked} is over this server's limit of {cap} (--max-tokens)", param)
        limit = self.config.max_prompt_tokens or self.context
        if limit is not None and prompt_tokens > limit:
            flag = "--max-prompt-tokens" if self.config.max_prompt_tokens else "the model's context length"
            raise APIError(
                400, f"the prompt is {prompt_tokens} tokens (images included), over the limit of {limit} "
                f"({flag}); shorten the conversation", "messages", "context_length_exceeded",
            )  # fmt: skip
        if self.context is None:
            return asked or cap
        room = self.context - prompt_tokens
        if room < 1 or (asked or 0) > room:
            why = f"and {param}={asked} need more than" if asked else "leave no room to answer in"
            message = f"the prompt's {prompt_tokens} tokens {why} the model's context ({self.context} tokens)"
            raise APIError(400, message, param if asked else "messages", "context_length_exceeded")
        return asked or min(cap, room)
