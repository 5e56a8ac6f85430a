"""One batch's rows: the jobs, the events they send their HTTP handlers, and per-row decoding.

Inside one `generate` call each row is its own request. `Rows` (a stopping criterion, which `generate`
calls once per step with the ids so far) turns each row's new token into text deltas, and ends the row at
end-of-sequence, at its own `max_tokens`, at one of its stop strings, or when its client has gone
(cancelled); a finished row's reply is delivered at once, not at the end of the batch, and `generate`
returns when every row has finished. `RowSampler` samples each row with its own temperature, top-p and
seeded random generator (greedy rows are left to the argmax), so one batch can mix greedy and sampled
requests, and a seeded request gives the same reply whatever batch it lands in.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import LogitsProcessor, StoppingCriteria

from vistune.infer.api import APIError
from vistune.infer.generate import Generator


@dataclass
class Delta:
    """More text of the reply."""

    text: str


@dataclass
class Done:
    """The reply is complete: `finish` is `stop` or `length`."""

    finish: str
    completion_tokens: int


@dataclass
class Failed:
    """The request failed after it was accepted."""

    error: APIError


Event = Delta | Done | Failed


@dataclass
class ImageItem:
    """One image of a request: its bytes' SHA-256, and its cached features or its decoded pixels."""

    key: str
    features: torch.Tensor | None = None  # (N, D_vision), held from the cache when the request came in
    image: Image.Image | None = None


@dataclass
class Job:
    """One accepted request on its way through the scheduler."""

    prompt: list[int]
    images: list[ImageItem]
    max_tokens: int
    emit: Callable[[Event], None]  # thread-safe: hands an event to the waiting HTTP handler
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.monotonic)


class Rows(StoppingCriteria):
    """Per-row decoding state of one batch; called by `generate` once per step with the ids so far."""

    def __init__(self, jobs: list[Job], generator: Generator, lock: threading.Lock):
        self.jobs, self.tokenizer, self.eos, self.lock = jobs, generator.tokenizer, set(generator.eos), lock
        self.ids: list[list[int]] = [[] for _ in jobs]
        self.sent = [""] * len(jobs)
        self.finished: list[str | None] = [None] * len(jobs)
        self.taken = [0] * len(jobs)  # tokens each row took from `generate`, its last one included
        self.tokens = self.cancelled = 0

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for i, token in enumerate(last):
            if self.finished[i] is None:
                self._step(i, token)
        return torch.tensor([f is not None for f in self.finished], device=input_ids.device)

    def _step(self, i: int, token: int) -> None:
        job = self.jobs[i]
        if job.cancelled.is_set():  # the client has gone: drop the row, say nothing
            self.finished[i] = "cancelled"
            self.cancelled += 1
            return
        self.tokens += 1
        self.taken[i] += 1
        if token in self.eos:
            return self._finish(i, "stop", self._text(i).rstrip(), 1)
        self.ids[i].append(token)
        text = self._text(i)
        cut = min((k for k in (text.find(s) for s in job.stop) if k >= 0), default=-1)
        if cut >= 0:
            return self._finish(i, "stop", text[:cut].rstrip(), 0)
        if len(self.ids[i]) >= job.max_tokens:
            return self._finish(i, "length", text.rstrip(), 0)
        self._send(i, safe_prefix(text, job.stop))

    def _text(self, i: int) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids[i], skip_special_tokens=True).lstrip()

    def _send(self, i: int, visible: str) -> None:
        """Stream what became visible; text is only ever appended (held back until it is stable)."""
        if len(visible) > len(self.sent[i]) and visible.startswith(self.sent[i]):
            self.jobs[i].emit(Delta(visible[len(self.sent[i]) :]))
            self.sent[i] = visible

    def _finish(self, i: int, reason: str, text: str, extra_tokens: int) -> None:
        self._send(i, text)
        self.finished[i] = reason
        self.jobs[i].emit(Done(reason, len(self.ids[i]) + extra_tokens))

    def generated(self, output: torch.Tensor) -> list[list[int] | None]:
        """Each row's own tokens in `generate`'s (B, T) output (what came after it finished is padding);
        None for a cancelled row."""
        return [
            None if reason == "cancelled" else output[i, : self.taken[i]].tolist()
            for i, reason in enumerate(self.finished)
        ]

    def close(self) -> None:
        """After `generate`: a row still open ran into the batch's token limit (its own, at most)."""
        for i, reason in enumerate(self.finished):
            if reason is None:
                self._finish(i, "length", self._text(i).rstrip(), 0)


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that can be shown now: no trailing whitespace, no half-decoded character, and
    no tail that might be the start of a stop string."""
    text = text.rstrip()
    if text.endswith("\ufffd"):
        text = text.rstrip("\ufffd")
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                text = text[:-k]
                break
    return text


class RowSampler(LogitsProcessor):
    """Each sampled row draws its token with its own temperature, top-p and random generator; the other
    tokens are masked, so `generate`'s argmax picks it. Greedy and finished rows are left alone."""

    def __init__(self, jobs: list[Job], rows: Rows):
        self.jobs, self.rows = jobs, rows
        self.generators: list[torch.Generator | None] = [None] * len(jobs)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores
        for i, job in enumerate(self.jobs):
            if job.temperature == 0 or self.rows.finished[i] is not None:
                continue
            if out is scores:
                out = scores.clone()
            token = self._draw(i, scores[i].float())
            out[i] = float("-inf")
            out[i, token] = 0.0
        return out

    def _draw(self, i: int, logits: torch.Tensor) -> int:
        job = self.jobs[i]
        if self.generators[i] is None:
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            self.generators[i] = torch.Generator(device=logits.device).manual_seed(seed % 2**63)
        probs = torch.softmax(logits / job.temperature, dim=-1)
        if job.top_p < 1.0:  # keep the most likely tokens until their mass reaches top_p (at least one)
            sorted_p, order = probs.sort(descending=True)
            keep = (sorted_p.cumsum(0) - sorted_p) < job.top_p
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generators[i]))
