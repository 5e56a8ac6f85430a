"""Where each visual token lies: sin-cos codes of its grid row and column, appended to its features.

A projector maps each token on its own (linear, MLP), merges neighbours (pixel shuffle) or pools the
tokens with learned queries (the resampler, which sees them as an unordered set). What a token says about
*where* it is comes from the tower alone, and a CNN says little: its features are nearly the same for a
thing wherever it stands. The LLM is then left to tell left from right by the tokens' order in the
sequence, which it learns slowly (a 135M LLM stays at chance on "which digit is on the left?").

`GridPositions` appends to every grid token a fixed code of its place: for the row and for the column,
sin and cos of the position at `dim / 4` frequencies. Positions are fractions of the grid (the centre of
cell i of h is (i + 0.5) / h), so the same place in an image gets the same code on any grid. A token
outside the grid (a CLS token) gets zeros. The code has no parameters: the projector's first layer
learns what to make of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_codes(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(h * w, dim) codes of a row-major grid: [sin, cos](pi 2^k row), then the same of the column."""
    if dim < 4 or dim % 4:
        raise ValueError(f"projector.position_codes must be a positive multiple of 4, got {dim}")
    h, w = grid
    freqs = math.pi * 2.0 ** torch.arange(dim // 4, dtype=torch.float64)  # (dim/4,)

    def axis(n: int) -> torch.Tensor:  # (n, dim/2)
        angles = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], 1)

    rows = axis(h)[:, None].expand(h, w, dim // 2)
    cols = axis(w)[None].expand(h, w, dim // 2)
    return torch.cat([rows, cols], -1).reshape(h * w, dim).float()


class GridPositions(nn.Module):
    """(B, N, D) tower features -> (B, N, D + dim): each grid token's code appended (zeros before a CLS).

    The codes are a buffer that is not saved: they are rebuilt from the grid and `dim`."""

    def __init__(self, grid: tuple[int, int], dim: int, tokens: int) -> None:
        super().__init__()
        extra = tokens - grid[0] * grid[1]
        if extra not in (0, 1):
            raise ValueError(f"position codes: {tokens} tokens do not fit a {grid[0]}x{grid[1]} grid")
        codes = torch.cat([torch.zeros(extra, dim), sincos_codes(grid, dim)])  # CLS first, as CLIP has it
        self.register_buffer("codes", codes, persistent=False)
        self.dim = dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        codes = self.codes.to(features.dtype).expand(features.shape[0], -1, -1)
        return torch.cat([features, codes], -1)

