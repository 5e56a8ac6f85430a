"""Batching for the server: requests that arrive together run as one batch through the Generator.

One worker thread owns the model. It waits for a request, then up to `max_wait_s` (counted from that
request's arrival) for more, up to `max_batch`, and runs them as one `Generator.generate_ids` call; requests
that come while a batch runs wait for the next one (static batching: transformers' `generate` cannot take
new rows mid-call). Prompts are left-padded to the batch's longest, so a request joins a batch only while
padding stays at most half of the batch's prompt tokens (`fits`): a very long prompt (a conversation with
eight images) waits for the next batch, which it leads, instead of making every short row of this one pay
for its length. The queue of waiting requests is bounded: `submit` raises `QueueFull` with a retry hint when
it is full (the server answers 429).

Inside a batch each row is its own request, decoded and sampled by `vistune.infer.decoding`.

Image features (the tower's output) are cached by the SHA-256 of the image bytes in a `FeatureCache`, an LRU
bounded in bytes, so a follow-up turn about the same image neither decodes nor encodes it again. The
language model's keys and values of each answered conversation are kept in a `PrefixCache`
(`vistune.infer.prefix`), so a request that extends a conversation about the same images computes only its
new tokens; in a batch, the rows share one reused start (the least of left padding plus reusable prefix over
the rows), so a row without a prefix limits the others to its padding.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import OrderedDict, deque

import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteriaList

from vistune.infer.api import APIError
from vistune.infer.decoding import Failed, Job, Rows, RowSampler
from vistune.infer.generate import Generator
from vistune.infer.prefix import PrefixCache

log = logging.getLogger("vistune.serve")


class QueueFull(Exception):
    """The queue of waiting requests is full; `retry_after` is a hint in whole seconds."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class FeatureCache:
    """LRU of image features by SHA-256 of the image bytes, bounded by the features' bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits = max_bytes, 0, 0
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> torch.Tensor | None:
        """The features of these image bytes, if cached (counted as a hit)."""
        with self._lock:
            found = self._items.get(key)
            if found is not None:
                self._items.move_to_end(key)
                self.hits += 1
            return found

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        with self._lock:
            if key in self._items or size > self.max_bytes:
                return
            self._items[key] = features
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.numel() * old.element_size()

    def __len__(self) -> int:
        return len(self._items)


def fits(lengths: list[int], length: int, padding_share: float = 0.5) -> bool:
    """Whether a prompt of `length` may join a batch of prompts of `lengths` (left-padded to the longest):
    the batch's padding stays at most `padding_share` of its prompt tokens."""
    rows, total = len(lengths) + 1, sum(lengths) + length
    return rows * max(length, *lengths) * (1 - padding_share) <= total


class Scheduler:
    """The worker thread that batches jobs through a Generator."""

    def __init__(
        self,
        generator: Generator,
        cache: FeatureCache,
        max_batch: int = 16,
        max_wait_s: float = 0.01,
        max_queue: int = 128,
        tokenizer_lock: threading.Lock | None = None,
        prefixes: PrefixCache | None = None,
    ):
        self.generator, self.cache, self.max_batch, self.max_wait_s = generator, cache, max_batch, max_wait_s
        self.prefixes = prefixes  # only this worker thread touches it
        self.tokenizer_lock = tokenizer_lock or threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self._deferred: deque[Job] = deque()  # taken out for a batch they did not fit: first in the next
        self._thread: threading.Thread | None = None
        self.running = 0
        self.batch_seconds = 1.0  # moving average, for the 429 retry hint
        self.stats = {"batches": 0, "jobs": 0, "cancelled": 0, "largest_batch": 0, "tokens": 0,
                      "prompt_tokens": 0, "reused_tokens": 0}  # fmt: skip

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="vistune-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the running batch, fail the waiting jobs (503), and end the worker."""
        while self._deferred:
            self._deferred.popleft().emit(Failed(APIError(503, "the server is shutting down")))
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.emit(Failed(APIError(503, "the server is shutting down")))
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            log.warning("the scheduler's queue stayed full while stopping")
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize() + len(self._deferred)

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            waves = self.queued / self.max_batch + 1
            raise QueueFull(max(1, math.ceil(waves * self.batch_seconds))) from None

    def _loop(self) -> None:
        while (batch := self._collect()) is not None:
            if not batch:
                continue
            started = time.monotonic()
            self.running = len(batch)
            try:
                self._run(batch)
            except Exception:  # a bug must fail these requests, not the server
                log.exception("generation failed for a batch of %d", len(batch))
                for job in batch:
                    job.emit(Failed(APIError(500, "internal error while generating; see the server log")))
            finally:
                self.running = 0
            self.batch_seconds = 0.8 * self.batch_seconds + 0.2 * (time.monotonic() - started)

    def _collect(self) -> list[Job] | None:
        """The next batch: the first waiting job (one deferred from the last batch first) and whoever
        arrives within max_wait_s of it and `fits`; the others wait for the next batch. None = stop."""
        first = self._deferred.popleft() if self._deferred else self._queue.get()
        if first is None:
            return None
        batch, lengths, skipped = [first], [len(first.prompt)], []
        deadline = first.arrived + self.max_wait_s
        while len(batch) < self.max_batch:
            if self._deferred:
                job = self._deferred.popleft()
            else:
                try:
                    job = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if job is None:  # stop: run what we have, then end
                self._queue.put(None)
                break
            if fits(lengths, len(job.prompt)):
                batch.append(job)
                lengths.append(len(job.prompt))
            else:
                skipped.append(job)
        self._deferred.extendleft(reversed(skipped))  # in their order, before anything left deferred
        live = [job for job in batch if not job.cancelled.is_set()]
        self.stats["cancelled"] += len(batch) - len(live)
        return live

    def _run(self, jobs: list[Job]) -> None:
        prompts = [job.prompt for job in jobs]
        keys = [[item.key for item in job.images] for job in jobs]
        plan = self.prefixes.plan(prompts, keys) if self.prefixes is not None else None
        features = self._features(jobs, plan.images_reused if plan else [0] * len(jobs))
        rows = Rows(jobs, self.generator, self.tokenizer_lock)
        output = self.generator.generate_ids(
            prompts, features, max(job.max_tokens for job in jobs),
            logits_processor=LogitsProcessorList([RowSampler(jobs, rows)]),
            stopping_criteria=StoppingCriteriaList([rows]), cache=plan.cache if plan else None,
        )  # fmt: skip
        rows.close()
        if plan:
            self.stats["reused_tokens"] += sum(plan.tokens_reused)
            self.prefixes.remember(plan, prompts, keys, rows.generated(output))
        self.stats["prompt_tokens"] += sum(map(len, prompts))
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(jobs))
        self.stats["tokens"] += rows.tokens
        self.stats["cancelled"] += rows.cancelled

    def _features(self, jobs: list[Job], reused: list[int]) -> torch.Tensor | None:
        """(B_img, N, D) features of the batch's images in prompt order, encoding only the new ones;
        without each job's first `reused[i]` images, whose tokens lie in a reused prefix."""
        for job, skip in zip(jobs, reused, strict=True):
            for item in job.images[:skip]:
                item.image = None  # its keys and values are reused: neither features nor pixels needed
        items = [item for job, skip in zip(jobs, reused, strict=True) for item in job.images[skip:]]
        pending: dict[str, Image.Image] = {}
        for item in items:
            if item.features is None:
                item.features = self.cache.get(item.key)
            if item.features is None and item.key not in pending:
                pending[item.key] = item.image
        if pending:
            encoded = self.generator.encode_images(list(pending.values()))
            fresh = {key: row.clone() for key, row in zip(pending, encoded, strict=True)}
            for key, row in fresh.items():
                self.cache.put(key, row)
            for item in items:
                item.features = item.features if item.features is not None else fresh[item.key]
        for item in items:
            item.image = None  # pixels are not needed any more
        return torch.stack([item.features for item in items]) if items else None
