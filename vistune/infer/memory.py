"""The server's budget for decoded images in flight: requests hold leases on it while they live.

Each image a request decodes first reserves its decoded size from the header (width x height x 3 bytes,
before any pixel is decoded); once decoded (and downscaled to what the tower needs) its lease shrinks to
what the image now holds, and the request gives all of it back when it ends. An image that could never
fit is refused with 413; one that does not fit now, because other requests hold the budget, gets 429
with `Retry-After` at once: a request never waits for memory while holding a worker that others need.

`DecodeSlots` bounds the CPU that large images take: at most `n` requests at a time decode images of
more than `LARGE_PIXELS` in full (every format but JPEG, which is decoded at a reduced scale); a request
that finds every slot taken gets 429 with `Retry-After` at once, for the same reason.
"""

from __future__ import annotations

import threading

from vistune.infer.api import APIError

MB = 2**20
LARGE_PIXELS = 4_000_000  # an image above this, decoded in full, takes a decode slot


class ImageMemory:
    """Bytes of decoded images held by the requests in flight, against `budget` bytes."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        """A request's share of the budget, empty until it reserves."""
        return Lease(self)

    def _take(self, n: int) -> bool:
        with self._lock:
            if self.used + n > self.budget:
                return False
            self.used += n
            return True

    def _give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Lease:
    """What one request holds of an `ImageMemory`; `release` gives it all back (more than once is fine)."""

    def __init__(self, memory: ImageMemory):
        self.memory, self.held = memory, 0

    def reserve(self, n: int, param: str, what: str) -> None:
        """Hold `n` more bytes for `what` (an image, said in errors), or raise 413 / 429 naming `param`."""
        budget = self.memory.budget
        if n > budget:
            raise APIError(
                413, f"{what} needs {n / MB:.0f} MiB decoded, over this server's memory for images in flight "
                f"({budget / MB:.0f} MiB, --max-image-memory-mb)", param, "image_too_large",
            )  # fmt: skip
        if not self.memory._take(n):
            raise APIError(
                429, f"the server's memory for decoded images is in use ({budget / MB:.0f} MiB, "
                "--max-image-memory-mb); retry in 1 s", param, "image_memory_busy", {"Retry-After": "1"},
            )  # fmt: skip
        self.held += n

    def shrink(self, by: int) -> None:
        """Give back `by` bytes of what is held (an image downscaled after decoding)."""
        by = min(by, self.held)
        self.held -= by
        self.memory._give(by)

    def release(self) -> None:
        self.shrink(self.held)


class DecodeSlots:
    """At most `n` requests at a time decoding large images in full; `take` gives 429 when none is free."""

    def __init__(self, n: int):
        self._slots = threading.Semaphore(n)

    def take(self, param: str) -> None:
        if not self._slots.acquire(blocking=False):
            raise APIError(
                429, "the server is decoding other large images; retry in 1 s (--max-large-decodes)", param,
                "decoder_busy", {"Retry-After": "1"},
            )  # fmt: skip

    def give(self) -> None:
        self._slots.release()
