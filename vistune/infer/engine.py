"""From a request body to a queued job: limits, images, the prompt, and the token budget.

`Engine.prepare_body` runs in one of the engine's worker threads (`prepare_threads` of them, at a lower
CPU priority than the scheduler's thread on Linux, so that heavy requests yield the CPU to generation),
so neither parsing, nor images, nor rendering ever runs on the event loop or under a lock another
request needs: the body is
parsed with the message count capped before and after (`api.parse_request`), the text of the messages
is capped in characters before anything is tokenized, each image reserves its decoded size from the
image memory budget before it is decoded (`vistune.infer.memory`), and the prompt is rendered with a
tokenizer of the engine's own pool (the scheduler decodes with the model's). `APIError` names the
offending field for anything over a limit: messages, characters, images per request, bytes, pixels and
memory per image, `max_tokens`, and prompt length (the prompt is never cut silently).
"""

from __future__ import annotations

import copy
import hashlib
import os
import queue
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vistune.data.records import Turn
from vistune.infer.api import (
    APIError,
    ChatRequest,
    ImageRef,
    TextPart,
    check_request,
    parse_request,
    requested_max_tokens,
    stop_strings,
    text_characters,
    to_turns,
)
from vistune.infer.context import ContextError, context_length, token_budget
from vistune.infer.decoding import ImageItem
from vistune.infer.generate import Generator
from vistune.infer.image_input import ImageLimits, decode_image, image_bytes
from vistune.infer.memory import LARGE_PIXELS, DecodeSlots, ImageMemory, Lease
from vistune.infer.scheduler import FeatureCache, Scheduler
from vistune.model.template import RenderError

MB = 2**20
CHARS_PER_TOKEN = 16  # the default text cap: characters per token of the prompt limit (text is ~4)
UNBOUNDED_CHARS = 1_000_000  # ... and when the model states no context
PREPARE_NICE = 5  # the worker threads' nice value: the scheduler's thread (0) gets the CPU first


def _lower_priority() -> None:
    """Run this worker thread at PREPARE_NICE (Linux sets nice values per thread; elsewhere: as is)."""
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), PREPARE_NICE)
        except OSError:
            pass


@dataclass(frozen=True)
class ServeConfig:
    """Everything `vistune serve` can be told; every limit has a flag of the same name."""

    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 32 * MB
    body_timeout_s: float = 30.0  # the whole body must arrive within this, else 408 and the connection closed
    max_messages: int = 512
    max_prompt_chars: int | None = None  # None: CHARS_PER_TOKEN per token of the prompt limit
    max_image_bytes: int = 10 * MB
    max_image_pixels: int = 25_000_000
    max_images: int = 8
    max_image_memory_bytes: int = 512 * MB  # decoded images of the requests in flight
    max_large_decodes: int = 1  # requests decoding images of more than LARGE_PIXELS in full at a time
    max_tokens: int = 1024
    max_prompt_tokens: int | None = None  # None: the model's context length
    allow_remote_images: bool = False
    fetch_timeout_s: float = 10.0
    max_batch: int = 16
    max_wait_s: float = 0.01
    max_queue: int = 128
    feature_cache_bytes: int = 256 * MB
    prefix_cache_bytes: int = 256 * MB  # conversations' keys and values, reused by follow-ups; 0: off
    explain: bool = False  # serve POST /v1/explain (relevance maps; one at a time): off unless asked for
    prepare_threads: int = 4  # requests parsed, decoded and rendered at the same time
    # A request refused for a size limit is answered after this pause: a client that repeats it at once
    # sends one a second, and the pause costs the server nothing (0: answered at once).
    refusal_delay_s: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_messages", "max_image_bytes", "max_image_pixels", "max_images",
                     "max_image_memory_bytes", "max_large_decodes", "max_tokens", "max_batch", "max_queue",
                     "prepare_threads"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_prompt_chars"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"serve: {name} must be at least 1, got {getattr(self, name)}")
        if (
            min(self.max_wait_s, self.refusal_delay_s, self.feature_cache_bytes, self.prefix_cache_bytes) < 0
            or min(self.fetch_timeout_s, self.body_timeout_s) <= 0
        ):
            raise ValueError(
                "serve: max_wait_s, refusal_delay_s, feature_cache_bytes and prefix_cache_bytes must be "
                ">= 0, fetch_timeout_s and body_timeout_s > 0"
            )


@dataclass
class Prepared:
    """What the scheduler and the reply need of a request (the request itself, images and all, is gone)."""

    prompt: list[int]
    images: list[ImageItem]
    max_tokens: int
    lease: Lease | None = None  # the decoded images' share of the image memory; released when answered
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


class TokenizerPool:
    """Copies of a tokenizer, one per worker thread: rendering never waits for the scheduler's tokenizer,
    nor the scheduler for it (a fast tokenizer's encoding settings are shared state)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, n: int):
        self._free: queue.SimpleQueue[PreTrainedTokenizerBase] = queue.SimpleQueue()
        for _ in range(n):
            self._free.put(copy.deepcopy(tokenizer))

    @contextmanager
    def borrow(self) -> Iterator[PreTrainedTokenizerBase]:
        tokenizer = self._free.get()  # never waits: no more borrowers than copies
        try:
            yield tokenizer
        finally:
            self._free.put(tokenizer)


class Engine:
    """The served model with its scheduler, feature cache, tokenizers and limits."""

    def __init__(self, generator: Generator, config: ServeConfig):
        self.generator, self.config = generator, config
        self.context: int | None = context_length(generator.llm.config)
        self.prompt_limit = config.max_prompt_tokens or self.context
        self.max_chars = config.max_prompt_chars or (
            CHARS_PER_TOKEN * self.prompt_limit if self.prompt_limit else UNBOUNDED_CHARS
        )
        self.cache = FeatureCache(config.feature_cache_bytes)
        self.prefixes = generator.prefix_cache(config.prefix_cache_bytes)
        self.tokenizers = TokenizerPool(generator.tokenizer, config.prepare_threads)
        self.workers = ThreadPoolExecutor(config.prepare_threads, "vistune-prepare", _lower_priority)
        self.memory = ImageMemory(config.max_image_memory_bytes)
        self.large_decodes = DecodeSlots(config.max_large_decodes)
        self.scheduler = Scheduler(
            generator, self.cache, config.max_batch, config.max_wait_s, config.max_queue, threading.Lock(),
            self.prefixes,
        )  # fmt: skip
        self.limits = ImageLimits(
            config.max_image_bytes,
            config.max_image_pixels,
            config.allow_remote_images,
            config.fetch_timeout_s,
        )
        tower = getattr(generator.vlm, "vision", None)
        # Decoded images are downscaled to twice the tower's input side at most: what any squaring
        # (squash, pad, crop) then resizes from.
        self.min_side = 2 * tower.image_size if tower is not None else None

    @property
    def takes_images(self) -> bool:
        return self.generator.vlm is not None

    def prepare_body(self, body: bytes, content_type: str | None) -> Prepared:
        """Parse a request body (message count and text size capped first) and prepare it; in a worker."""
        return self.prepare(parse_request(body, content_type, self.config.max_messages, self.max_chars))

    def prepare_explain(
        self, body: bytes, content_type: str | None
    ) -> tuple[Prepared, list[Turn], str | None]:
        """A `/v1/explain` body: a chat request whose last message may be the assistant's answer to explain.
        Checked against the same limits as chat; its images are decoded whatever the feature cache
        holds (their pixels are what is mapped). Returns the prepared request, its turns (up to the
        question) and the answer (None: the model answers)."""
        req = parse_request(body, content_type, self.config.max_messages, self.max_chars)
        if req.stream:
            raise APIError(400, "an explanation is not streamed: leave stream out", "stream")
        answer, last = None, req.messages[-1]
        if last.role == "assistant":
            answer = (
                last.content
                if isinstance(last.content, str)
                else "\n".join(p.text for p in last.content if isinstance(p, TextPart))
            )
            req = req.model_copy(update={"messages": req.messages[:-1]})
            if not req.messages:
                raise APIError(400, "the answer to explain needs the user message it answers", "messages")
        prepared = self.prepare(req, cached=False)
        return prepared, to_turns(req.messages)[0], answer

    def prepare(self, req: ChatRequest, cached: bool = True) -> Prepared:
        """Check the request against the limits, load its images, render its prompt (in a thread).
        `cached`: images whose features the cache holds are not decoded (their pixels are not needed)."""
        check_request(req, self.config.model_name)
        self._check_text(req)
        turns, refs = to_turns(req.messages)
        self._check_image_count(refs)
        lease = self.memory.lease()
        try:
            images = self._images(refs, lease, cached)
            try:
                with self.tokenizers.borrow() as tokenizer:
                    prompt = self.generator.prompt_ids(turns, len(refs), tokenizer)
            except RenderError as err:
                raise APIError(400, f"messages: {err}".replace("conversation: ", ""), "messages") from None
            max_tokens = self._max_tokens(req, len(prompt))
        except BaseException:
            lease.release()
            raise
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return Prepared(
            prompt, images, max_tokens, lease, req.temperature, req.top_p, req.seed, stop_strings(req),
            req.stream, usage,
        )  # fmt: skip

    def _check_text(self, req: ChatRequest) -> None:
        """The messages' text in characters, before anything is tokenized."""
        chars = text_characters(req.messages)
        if chars > self.max_chars:
            how = "--max-prompt-chars" if self.config.max_prompt_chars else (
                f"--max-prompt-chars; by default {CHARS_PER_TOKEN} per token of the prompt limit"
            )  # fmt: skip
            raise APIError(
                400, f"the messages hold {chars} characters of text, over this server's limit of "
                f"{self.max_chars} ({how}); shorten the conversation", "messages", "context_length_exceeded",
            )  # fmt: skip

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

    def _images(self, refs: list[ImageRef], lease: Lease, cached: bool = True) -> list[ImageItem]:
        """The request's images, one after another; a decode slot, once taken, is kept until the last."""
        slot: list[bool] = []
        try:
            return [self._image(ref, lease, slot, cached) for ref in refs]
        finally:
            if slot:
                self.large_decodes.give()

    def _image(self, ref: ImageRef, lease: Lease, slot: list[bool], cached: bool = True) -> ImageItem:
        data = image_bytes(ref.url, ref.param, self.limits)
        key = hashlib.sha256(data).hexdigest()
        features = self.cache.get(key) if cached else None
        if features is not None:  # seen before: neither decoded nor encoded again
            return ImageItem(key, features=features)
        reserved = {"n": 0}

        def reserve(n: int, kind: str) -> None:
            if n > 3 * LARGE_PIXELS and kind != "JPEG" and not slot:  # decoded in full: CPU-heavy
                self.large_decodes.take(ref.param)
                slot.append(True)
            lease.reserve(n, ref.param, "the image")
            reserved["n"] = n

        image = decode_image(data, ref.param, self.limits.max_pixels, self.min_side, reserve)
        lease.shrink(max(0, reserved["n"] - image.width * image.height * 3))  # it now holds this much
        return ImageItem(key, image=image)

    def _max_tokens(self, req: ChatRequest, prompt_tokens: int) -> int:
        """The request's token budget: asked for (at most --max-tokens), or what the context leaves."""
        cap, asked = self.config.max_tokens, requested_max_tokens(req)
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        if asked is not None and asked > cap:
            raise APIError(400, f"{param}={asked} is over this server's limit of {cap} (--max-tokens)", param)
        limit_name = "--max-prompt-tokens" if self.config.max_prompt_tokens else "the model's context length"
        try:
            room = token_budget(
                prompt_tokens, asked, self.context, prompt_limit=self.config.max_prompt_tokens,
                limit_name=limit_name, asked_name=param,
            )  # fmt: skip
        except ContextError as err:
            raise APIError(400, str(err), err.param, "context_length_exceeded") from None
        return asked or (cap if room is None else min(cap, room))
