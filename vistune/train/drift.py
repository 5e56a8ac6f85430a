"""Watching the image tokens while a `vlm` stage trains: their size against the LLM's own words.

The LLM reads image tokens beside word embeddings of a size it was trained on. A projector (or a tower
learning in the same stage) that inflates them drowns the words around them, and nothing fails: the
answers just stop depending on the image. The mean L2
norm of the image tokens is summed on the device as the stage runs and read back at log steps only;
each log line carries it (`image_token_norm`) and the words' (`word_norm`), and a warning is printed
once when the tokens have grown or shrunk `DRIFT` times from their first reading.
"""

from __future__ import annotations

import torch

DRIFT = 4.0  # warn once the image tokens' mean norm moves this many times from where it started


class TokenDrift:
    """Running mean norm of image tokens; `read()` returns the figures since the last read and a
    warning (once) when they drift."""

    def __init__(self, word_embeddings: torch.Tensor, tower_learns: bool) -> None:
        self.word_norm = float(word_embeddings.detach().float().norm(dim=-1).mean())
        self.tower_learns = tower_learns
        self._sum: torch.Tensor | None = None  # on the device: no host read while a step runs
        self._count = 0
        self.first: float | None = None
        self.warned = False

    @torch.no_grad()
    def add(self, image_embeds: torch.Tensor) -> None:
        """Take in a batch of (B, tokens, D) image tokens."""
        norms = image_embeds.detach().float().norm(dim=-1)
        self._sum = norms.sum() if self._sum is None else self._sum + norms.sum()
        self._count += norms.numel()

    def read(self) -> tuple[dict[str, float], str | None]:
        """(figures, warning): the mean norm since the last read (a host read) and the words'."""
        if self._sum is None:
            return {}, None
        norm = float(self._sum) / self._count
        self._sum, self._count = None, 0
        self.first = norm if self.first is None else self.first
        figures = {"image_token_norm": round(norm, 4), "word_norm": round(self.word_norm, 4)}
        if self.warned or self.first / DRIFT < norm < self.first * DRIFT:
            return figures, None
        self.warned = True
        why = (
            "the tower learns in this stage: give it a lower lr_vision (e.g. lr / 10) or freeze it"
            if self.tower_learns
            else "lower the learning rate, or set projector.norm_tokens to keep them at the words' size"
        )
        return figures, (
            f"image tokens drift: mean norm {norm:.2f}, {norm / self.first:.1f}x the {self.first:.2f} they "
            f"started at (the LLM's words: {self.word_norm:.2f}); answers may stop depending on images: {why}"
        )
