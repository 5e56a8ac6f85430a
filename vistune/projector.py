"""Projectors: map vision features (B, N, Dv) to LLM input embeddings (B, N', Dl).

Adding a projector is one class plus one line in PROJECTORS.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vistune.config import ProjectorConfig


class Linear(nn.Module):
    """One linear map per token (LLaVA-1.0)."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    def num_tokens(self, n: int) -> int:
        return n


class MLP2xGelu(nn.Module):
    """Linear -> GELU -> Linear per token (LLaVA-1.5)."""

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def num_tokens(self, n: int) -> int:
        return n


class PixelShuffle(nn.Module):
    """Merge each f x f block of neighbouring patch tokens into one token, then project (Idefics3).

    (B, h*w, D) -> (B, h/f * w/f, D*f*f) -> Linear -> (B, h*w/f^2, Dl): f^2 fewer image tokens.
    """

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None):
        super().__init__()
        f = cfg.shuffle_factor
        if grid is None or grid[0] % f or grid[1] % f:
            raise ValueError(f"projector pixel_shuffle: token grid {grid} is not divisible by factor {f}")
        self.factor, self.grid = f, grid
        self.proj = nn.Linear(in_dim * f * f, out_dim)

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

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None):
        super().__init__()
        heads = max(h for h in (8, 4, 2, 1) if out_dim % h == 0)
        self.queries = nn.Parameter(torch.randn(cfg.num_queries, out_dim) / math.sqrt(out_dim))
        self.kv = nn.Linear(in_dim, out_dim)
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


class VisualWords(nn.Module):
    """Each image token becomes a mixture of the LLM's own word embeddings ("visual words").

    For every word group (say colours, shapes, sizes) a linear classifier over a patch token gives
    probabilities for "none" + the group's words; the token's embedding is the sum over groups of the
    probability-weighted word embeddings, which start as the LLM's input embeddings of those words and
    are trained with the rest. f x f neighbouring tokens are summed (f^2 fewer tokens). The LLM then reads
    image tokens much as it reads words; a `scene` stage's classifiers can initialise the groups'.
    """

    def __init__(self, cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None):
        super().__init__()
        if not cfg.words:
            raise ValueError("projector visual_words needs `words`: a list of word groups")
        f = cfg.shuffle_factor
        if grid is None or grid[0] % f or grid[1] % f:
            raise ValueError(f"projector visual_words: token grid {grid} is not divisible by factor {f}")
        self.groups = [list(g) for g in cfg.words]
        self.factor, self.grid = f, grid
        self.classifiers = nn.ModuleList(nn.Linear(in_dim, len(g) + 1) for g in self.groups)
        self.words = nn.ParameterList(nn.Parameter(torch.randn(len(g), out_dim) * 0.02) for g in self.groups)

    @torch.no_grad()
    def bind(self, embeddings: torch.Tensor, tokenizer) -> None:
        """Start each word's vector at the LLM's embedding of the word as it appears mid-sentence."""
        for group, vectors in zip(self.groups, self.words, strict=True):
            for k, word in enumerate(group):
                ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
                vectors[k] = embeddings[ids].mean(0).to(vectors.dtype)

    @torch.no_grad()
    def init_classifiers(self, heads: dict[str, nn.Linear], vocab: dict[str, tuple[str, ...]]) -> None:
        """Copy classifiers trained elsewhere (class 0 = none, then `vocab[name]` in order) into the
        groups with the same words."""
        for group, classifier in zip(self.groups, self.classifiers, strict=True):
            for name, words in vocab.items():
                if sorted(words) == sorted(group) and name in heads:
                    order = [0] + [1 + words.index(w) for w in group]
                    classifier.weight.copy_(heads[name].weight[order])
                    classifier.bias.copy_(heads[name].bias[order])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        (h, w), f = self.grid, self.factor
        out = 0
        for classifier, vectors in zip(self.classifiers, self.words, strict=True):
            probs = classifier(x[:, -h * w :]).softmax(-1)[..., 1:]  # (B, h*w, words): drop "none"
            out = out + probs @ vectors  # (B, h*w, Dl)
        out = out.view(b, h // f, f, w // f, f, -1).sum(dim=(2, 4))  # sum each f x f block
        return out.reshape(b, (h // f) * (w // f), -1)

    def num_tokens(self, n: int) -> int:
        return (self.grid[0] // self.factor) * (self.grid[1] // self.factor)


PROJECTORS: dict[str, type[nn.Module]] = {
    "linear": Linear,
    "mlp2x_gelu": MLP2xGelu,
    "pixel_shuffle": PixelShuffle,
    "resampler": Resampler,
    "visual_words": VisualWords,
}


def build_projector(
    cfg: ProjectorConfig, in_dim: int, out_dim: int, grid: tuple[int, int] | None
) -> nn.Module:
    """Build the projector named `cfg.name`; `grid` is the vision tower's (h, w) token layout."""
    if cfg.name not in PROJECTORS:
        raise ValueError(f"projector {cfg.name!r} is unknown; valid names: {sorted(PROJECTORS)}")
    return PROJECTORS[cfg.name](cfg, in_dim, out_dim, grid)
