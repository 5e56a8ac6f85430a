"""Key/value prefix reuse across chat turns: a follow-up turn computes only the tokens that are new.

After a turn is generated, the language model's keys and values of the conversation so far (the prompt
and the answer as they were fed, in a transformers `DynamicCache`) are kept as a `Prefix`, named by
its token ids and the content keys of its images (`image_key`: the same `<image>` token ids stand for
any picture). The next turn's prompt re-renders the conversation; where its token ids start with the
same ids, about the same images, only the rest is computed. The match is verified token by token: the
re-rendered answer may tokenize differently from what was generated, and the template closes the turn
with text the model never fed (`<|im_end|>\\n`), so the reused length is the common prefix, never
assumed. It is cut back so that it never ends inside an image's tokens, never covers an image with
other content, and leaves at least the last prompt token to compute (its logits give the first new
token).

`PrefixCache` is an LRU of prefixes bounded in bytes. For a batch it makes a `Plan`: one `DynamicCache`
holding the first `start` columns of the left-padded batch, where `start` is the least, over the rows,
of left padding plus reusable prefix (so one row without a prefix limits the batch to its padding).
A batch of one takes its prefix out of the LRU and crops it in place (`DynamicCache.crop`); a larger
batch copies the rows' prefixes side by side. After `generate`, `remember` cuts each row's keys and
values (without its left padding) back into the LRU.

Only models whose layers all use full attention (transformers' plain `DynamicLayer`) take part: a
sliding-window layer keeps too little of the past to be cropped back.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache, PreTrainedConfig
from transformers.cache_utils import DynamicLayer

# Fewer reusable tokens than this are computed afresh: they save nothing measurable, and conversations
# that share only the template's opening (`<|im_start|>user\n`) must not refresh each other in the LRU.
MIN_REUSE = 16


def image_key(image: Image.Image) -> str:
    """A content key of a decoded image: SHA-256 of its mode, size and pixels."""
    digest = hashlib.sha256(f"{image.mode} {image.size}\n".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def supports_reuse(config: PreTrainedConfig) -> bool:
    """Whether every layer of this model keeps a plain, croppable cache (full attention)."""
    return all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id lists (slice comparisons run in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if a[:mid] == b[:mid] else (low, mid)
    return low


@dataclass(frozen=True)
class ImageTokens:
    """How images appear in the token ids: `per_image` copies of `token_id` each (None: no images)."""

    token_id: int | None = None
    per_image: int = 0

    def starts(self, ids: Sequence[int], n: int) -> list[int]:
        """Where each image whose tokens begin in ids[:n] begins (a block may continue past n)."""
        if self.token_id is None or self.per_image == 0:
            return []
        positions = [i for i in range(n) if ids[i] == self.token_id]
        return positions[:: self.per_image]

    def count(self, ids: Sequence[int], n: int) -> int:
        """Images whose tokens lie wholly in ids[:n]."""
        if self.token_id is None or self.per_image == 0:
            return 0
        return sum(1 for i in range(n) if ids[i] == self.token_id) // self.per_image

    def floor(self, ids: Sequence[int], n: int) -> int:
        """n, moved back to the start of an image whose tokens it would split."""
        starts = self.starts(ids, n)
        if starts and starts[-1] + self.per_image > n:
            return starts[-1]
        return n


@dataclass
class Prefix:
    """A conversation's computed keys and values: the ids they hold, in order, and its images' keys.

    `cache` is a batch-of-one `DynamicCache` of exactly `len(ids)` positions; `image_keys` name the
    images whose tokens appear in `ids`, in order."""

    ids: list[int]
    image_keys: tuple[str, ...]
    cache: DynamicCache

    def __post_init__(self) -> None:
        if self.cache.get_seq_length() != len(self.ids):
            raise ValueError(f"a prefix of {len(self.ids)} ids holds {self.cache.get_seq_length()} positions")

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values)
        )

    def reusable(self, ids: Sequence[int], image_keys: Sequence[str], images: ImageTokens) -> int:
        """How many leading positions a prompt (ids, its images' keys) can take from this prefix.

        The common token-id prefix, cut back to the start of the first image that differs or that it
        would split, and short of the prompt's last token (computed for the first new token's logits)."""
        n = min(common_prefix(self.ids, ids), len(ids) - 1)
        n = images.floor(ids, max(n, 0))
        for k, start in enumerate(images.starts(ids, n)):
            if k >= len(self.image_keys) or k >= len(image_keys) or self.image_keys[k] != image_keys[k]:
                return start
        return n


@dataclass
class Plan:
    """How one batch reuses prefixes.

    `cache` holds the keys and values of the first `start` columns of the left-padded batch (empty when
    `start` is 0); `generate` extends it in place. Row i takes its first `tokens_reused[i]` prompt
    tokens from there, and with them its first `images_reused[i]` images (their features are not needed)."""

    start: int
    cache: DynamicCache
    tokens_reused: list[int]
    images_reused: list[int]


class PrefixCache:
    """An LRU of conversation prefixes, bounded by the bytes of their keys and values.

    Used by one thread at a time (the server's scheduler, or a chat session). A prompt reuses a prefix
    only from `min_reuse` tokens on. `hits` counts prompts that reused a prefix, `reused_tokens` the
    prompt tokens they did not compute."""

    def __init__(
        self, max_bytes: int, config: PreTrainedConfig, images: ImageTokens, min_reuse: int = MIN_REUSE
    ):
        if not supports_reuse(config):
            raise ValueError("prefix reuse needs full-attention layers only (no sliding window)")
        self.max_bytes, self.config, self.images, self.min_reuse = max_bytes, config, images, min_reuse
        self.bytes = self.hits = self.reused_tokens = 0
        self._items: OrderedDict[int, Prefix] = OrderedDict()
        self._next = 0

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Prefix]:
        """The held prefixes, least recently used first."""
        return iter(list(self._items.values()))

    def clear(self) -> None:
        self._items.clear()
        self.bytes = 0

    def find(self, ids: Sequence[int], image_keys: Sequence[str]) -> tuple[int, int] | None:
        """The held prefix that a prompt can reuse most of, as (its handle, reusable length); None if none."""
        best: tuple[int, int] | None = None
        for handle, prefix in reversed(self._items.items()):  # most recent first: it wins a tie
            n = prefix.reusable(ids, image_keys, self.images)
            if n >= max(1, self.min_reuse) and (best is None or n > best[1]):
                best = (handle, n)
        if best is not None:
            self._items.move_to_end(best[0])
        return best

    def put(self, prefix: Prefix) -> None:
        """Keep a prefix (evicting the least recently used), dropping the ones it extends."""
        size = prefix.nbytes
        if size > self.max_bytes:
            return
        for handle, held in list(self._items.items()):
            if (
                held.ids == prefix.ids[: len(held.ids)]
                and held.image_keys == prefix.image_keys[: len(held.image_keys)]
            ):
                self._drop(handle)  # whatever reused it can reuse at least as much of the new one
        self._items[self._next] = prefix
        self._next += 1
        self.bytes += size
        while self.bytes > self.max_bytes:
            self._drop(next(iter(self._items)))

    def _drop(self, handle: int) -> Prefix:
        prefix = self._items.pop(handle)
        self.bytes -= prefix.nbytes
        return prefix

    def plan(self, prompts: Sequence[list[int]], image_keys: Sequence[Sequence[str]]) -> Plan:
        """The batch's shared reusable start and a cache holding it (see the module docstring)."""
        width = max(map(len, prompts))
        found = [self.find(ids, keys) for ids, keys in zip(prompts, image_keys, strict=True)]
        pads = [width - len(ids) for ids in prompts]
        start = min(pad + (hit[1] if hit else 0) for pad, hit in zip(pads, found, strict=True))
        start = self._no_split(prompts, pads, start)
        cuts = [max(0, start - pad) for pad in pads]
        if start == 0:
            return Plan(0, DynamicCache(config=self.config), cuts, cuts)
        if len(prompts) == 1:  # one row, no padding: take its prefix out and crop it in place, no copy
            prefix = self._drop(found[0][0])
            prefix.cache.crop(start - len(prefix.ids))
            cache = prefix.cache
        else:
            cache = self._side_by_side(found, pads, start)
        self.hits += sum(cut > 0 for cut in cuts)
        self.reused_tokens += sum(cuts)
        reused = [self.images.count(ids, cut) for ids, cut in zip(prompts, cuts, strict=True)]
        return Plan(start, cache, cuts, reused)

    def _no_split(self, prompts: Sequence[list[int]], pads: list[int], start: int) -> int:
        """Lower a shared start that would end inside a row's image tokens (until no row's does)."""
        while True:
            lowered = min(
                pad + self.images.floor(ids, start - pad) if start > pad else start
                for ids, pad in zip(prompts, pads, strict=True)
            )
            if lowered == start:
                return start
            start = lowered

    def _side_by_side(self, found: list[tuple[int, int] | None], pads: list[int], start: int) -> DynamicCache:
        """(B, H, start, D) per layer: each row's left padding (zeros: masked out), then its prefix."""
        sources = [self._items[hit[0]].cache if hit else None for hit in found]
        model = next(source for source in sources if source is not None).layers
        data = []
        for index, layer in enumerate(model):
            keys, values = [], []
            for source, pad in zip(sources, pads, strict=True):
                held = source.layers[index] if source is not None and start > pad else None
                keys.append(_padded(layer.keys, held.keys if held else None, pad, start))
                values.append(_padded(layer.values, held.values if held else None, pad, start))
            data.append((torch.cat(keys), torch.cat(values)))
        return DynamicCache(ddp_cache_data=data, config=self.config)

    def remember(
        self,
        plan: Plan,
        prompts: Sequence[list[int]],
        image_keys: Sequence[Sequence[str]],
        generated: Sequence[list[int] | None],
    ) -> None:
        """After `generate`: keep each row's prefix, its prompt and the generated tokens that were fed.

        `generated[i]`: row i's real new tokens (up to and including its end-of-turn token; None to
        keep nothing, e.g. a cancelled row). The last token `generate` produced was never fed back, so
        the cache holds fewer columns than prompt + generated; its length says how many were."""
        cache, width = plan.cache, max(map(len, prompts))
        fed = cache.get_seq_length() - width
        for i, (ids, keys, new) in enumerate(zip(prompts, image_keys, generated, strict=True)):
            if new is None:
                continue
            held = [*ids, *new[: max(0, fed)]]
            pad = width - len(ids)
            if len(prompts) == 1 and len(held) == cache.get_seq_length():
                row = cache  # the cache is this row's alone
            else:  # DynamicLayer.update copies (torch.cat): the batch's tensors are not kept alive
                span = slice(pad, pad + len(held))
                data = [
                    (layer.keys[i : i + 1, :, span], layer.values[i : i + 1, :, span])
                    for layer in cache.layers
                ]
                row = DynamicCache(ddp_cache_data=data, config=self.config)
            self.put(Prefix(held, tuple(keys), row))


def _padded(like: torch.Tensor, held: torch.Tensor | None, pad: int, start: int) -> torch.Tensor:
    """(1, H, start, D): zeros for a row's `pad` columns of left padding, then its held prefix."""
    row = like.new_zeros(1, like.shape[1], start, like.shape[3])
    if held is not None:
        row[:, :, pad:] = held[:, :, : start - pad]
    return row
