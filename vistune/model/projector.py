"""Projectors: map vision features (B, N, Dv) to LLM input embeddings (B, N', Dl).

A projector is built as `factory(cfg, context)`: `cfg` is the ProjectorConfig, `context` says what it
connects (feature widths, the tower's token grid, the LLM's word embeddings and tokenizer). Built-in:
`linear`, `mlp2x_gelu`, `pixel_shuffle`, `resampler`. Extensions add more through their entry point
(`vistune.extensions.register_projector`); `projectors` joins both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vistune import extensions
from vistune.config import ProjectorConfig


@dataclass(frozen=True)
class ProjectorContext:
    """What a projector connects.

    Attributes:
        in_dim: Dv, the vision features' width.
        out_dim: Dl, the LLM's embedding width.
        grid: the tower's (h, w) token layout, or None when it has none.
        word_embeddings: (V, Dl) the LLM's input embeddings (projectors that start from words use them).
        tokenizer: the LLM's tokenizer.
    """

    in_dim: int
    out_dim: int
    grid: tuple[int, int] | None
    word_embeddings: torch.Tensor
    tokenizer: PreTrainedTokenizerBase


class Projector(Protocol):
    """What the VLM needs of a projector (an nn.Module)."""

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        """(B, N, Dv) vision features -> (B, N', Dl) LLM embeddings."""
        ...

    def num_tokens(self, n: int) -> int:
        """N', the image tokens per image, for N vision tokens."""
        ...


ProjectorFactory = Callable[[ProjectorConfig, ProjectorContext], nn.Module]


class Linear(nn.Module):
    """One linear map per token (LLaVA-1.0)."""

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        self.proj = nn.Linear(ctx.in_dim, ctx.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def num_tokens(self, n: int) -> int:
        return n


class MLP2xGelu(nn.Module):
    """Linear -> GELU -> Linear per token (LLaVA-1.5)."""

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(ctx.in_dim, ctx.out_dim), nn.GELU(), nn.Linear(ctx.out_dim, ctx.out_dim)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def num_tokens(self, n: int) -> int:
        return n


class PixelShuffle(nn.Module):
    """Merge each f x f block of neighbouring patch tokens into one token, then project (Idefics3).

    (B, h*w, D) -> (B, h/f * w/f, D*f*f) -> Linear -> (B, h*w/f^2, Dl): f^2 fewer image tokens.
    """

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        f, grid = cfg.shuffle_factor, ctx.grid
        if grid is None or grid[0] % f or grid[1] % f:
            raise ValueError(f"projector pixel_shuffle: token grid {grid} is not divisible by factor {f}")
        self.factor, self.grid = f, grid
        self.proj = nn.Linear(ctx.in_dim * f * f, ctx.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        (h, w), f = self.grid, self.factor
        if n != h * w:
            raise ValueError(f"pixel_shuffle expected {h * w} tokens (grid {h}x{w}), got {n}")
        x = x.view(b, h // f, f, w // f, f, d).permute(0, 1, 3, 2, 4, 5)  # (B, h/f, w/f, f, f, D)
        return self.proj(x.reshape(b, (h // f) * (w // f), f * f * d))

    def num_tokens(self, n: int) -> int:
        return n // (self.factor**2)


class Resampler(nn.Module):
    """Learned queries cross-attend to the image tokens (Flamingo/Qwen-VL style): a fixed token count."""

    def __init__(self, cfg: ProjectorConfig, ctx: ProjectorContext):
        super().__init__()
        out_dim = ctx.out_dim
        heads = max(h for h in (8, 4, 2, 1) if out_dim % h == 0)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, out_dim) / math.sqrt(out_dim))
        self.kv = nn.Linear(ctx.in_dim, out_dim)
        self.attn = nn.MultiheadAttention(out_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(out_dim)
        self.out = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        attended, _ = self.attn(q, kv, kv, need_weights=False)
        return self.out(self.norm(attended + q))

    def num_tokens(self, n: int) -> int:
        return self.queries.shape[0]


PROJECTORS: dict[str, ProjectorFactory] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGelu,
    "pixel_shuffle": PixelShuffle,
    "resampler": Resampler,
}
BUILT_IN = frozenset(PROJECTORS)  # these take their settings from named fields, not options


def projectors() -> dict[str, extensions.ProjectorPart]:
    """Every projector: the built-in ones and those the installed extensions add."""
    extensions.load_extensions()
    clash = sorted(set(PROJECTORS) & set(extensions.PROJECTORS))
    if clash:
        raise ValueError(f"projector(s) {clash} are built in; an extension cannot take them")
    return {name: extensions.ProjectorPart(f) for name, f in PROJECTORS.items()} | extensions.PROJECTORS


# Fields every saved projector config held before extension projectors took their settings from
# `options`; the built-in projectors never read them.
FORMER_FIELDS = ("words", "slots", "position_bins")


def upgrade_projector(saved: dict[str, Any]) -> dict[str, Any]:
    """A projector config saved by an earlier version, in today's form: an extension's projector brings
    its own settings up to date (its `upgrade`); the others drop the former fields."""
    part = projectors().get(saved.get("name"))
    if part is not None and part.upgrade is not None:
        return extensions.resolve(part.upgrade)(saved)
    return {k: v for k, v in saved.items() if k not in FORMER_FIELDS}


def build_projector(cfg: ProjectorConfig, ctx: ProjectorContext) -> nn.Module:
    """Build the projector named `cfg.name` for what `ctx` connects."""
    table = projectors()
    if cfg.name not in table:
        raise ValueError(f"projector {cfg.name!r} is unknown; valid names: {sorted(table)}")
    if cfg.name in BUILT_IN and cfg.options:
        raise ValueError(f"projector {cfg.name!r} takes no options; got {sorted(cfg.options)}")
    if cfg.name not in BUILT_IN and cfg.position_codes:
        raise ValueError(
            f"projector {cfg.name!r} reads the tower's own features; position_codes is for the built-in "
            f"projectors {sorted(BUILT_IN)}"
        )
    return extensions.resolve(table[cfg.name].factory)(cfg, ctx)
