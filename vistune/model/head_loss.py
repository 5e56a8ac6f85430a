"""The LM head and cross-entropy over the answer positions: all rows at once, or in chunks of rows.

All at once, the (N_answers, V) logits exist together, and so does their gradient: with SmolLM2's
49,152-word vocabulary, 2,048 answer tokens take 400 MB of fp32 logits. In chunks of `chunk` rows each
chunk's logits are reduced to its loss sum and dropped, and recomputed from the chunk's hidden states in
the backward pass (`torch.utils.checkpoint`), so at most (chunk, V) logits live at a time, for the
head's forward matmul once more. The rows' losses are the same either way; only the order in which
they are summed differs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def head_loss_sum(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Summed cross-entropy of `head(hidden)` ((N, D) hidden states -> (N, V) logits, taken in fp32)
    against `targets` (N,) token ids; with `chunk`, `chunk` rows at a time."""
    if chunk is None or hidden.shape[0] <= chunk:
        return _rows_loss(head, hidden, targets)
    return _chunked_loss(head, hidden, targets, chunk)


# Under torch.compile (`options.compile`) the chunks run eagerly between the compiled graphs: their number
# follows the batch, and traced, each count would be a graph of its own (a recompile per batch size).
@torch.compiler.disable
def _chunked_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    total = None
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        part = checkpoint(_rows_loss, head, hidden[rows], targets[rows], use_reentrant=False)
        total = part if total is None else total + part
    return total


def _rows_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
