"""The data order: which examples each micro-batch holds, a pure function of (seed, step, position).

Because the order depends on nothing but its position, a resumed run picks up at exactly the next batch,
and every process computes its own slice of each global batch without talking to the others.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

from vistune.config import Stage

GROUP_WINDOW = 8  # group_by_length sorts windows of this many global batches


def total_steps(stage: Stage, n: int, world: int) -> int:
    """Optimizer steps: `max_steps`, else enough global batches to cover `epochs` passes over the data."""
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * n / (stage.batch_size * stage.grad_accum * world)))


def batch_indices(
    n: int,
    seed: int,
    step: int,
    micro: int,
    rank: int,
    world: int,
    stage: Stage,
    lengths: Sequence[int] | None = None,
) -> list[int]:
    """Dataset indices of one micro-batch: a pure function of its position, so resume is exact.

    The global batch of `step` is `batch_size * grad_accum * world` consecutive positions of an endless
    sequence of per-epoch orders; process `rank` takes its slices of it. With `lengths` and
    `stage.group_by_length`, each epoch's order puts records of similar length in the same global batch.
    """
    size = stage.batch_size
    group = size * stage.grad_accum * world
    start = step * group + (micro * world + rank) * size
    lengths = tuple(lengths) if stage.group_by_length and lengths is not None else None
    orders: dict[int, torch.Tensor] = {}  # a batch spans at most two epochs: look each order up once
    out = []
    for pos in range(start, start + size):
        epoch, offset = divmod(pos, n)
        if epoch not in orders:
            orders[epoch] = _epoch_order(n, seed, epoch, lengths, group)
        out.append(int(orders[epoch][offset]))
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, lengths: tuple[int, ...] | None, group: int) -> torch.Tensor:
    """The order of epoch `epoch` over `n` records: seeded, so every process and every resume agrees.

    With lengths (LLaVA's group-by-length): sort each window of GROUP_WINDOW global batches of the
    shuffled order by length, cut it into global batches and shuffle those, so batches waste little
    padding but the order stays random.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    if lengths is None or group >= n:
        return order
    keys = torch.tensor(lengths)[order]
    window = group * GROUP_WINDOW
    parts = [
        order[i : i + window][keys[i : i + window].argsort(descending=True, stable=True)]
        for i in range(0, n, window)
    ]
    batches = torch.cat(parts).split(group)
    full = n // group  # a short last batch stays last, so every other batch starts on a batch boundary
    shuffled = [batches[i] for i in torch.randperm(full, generator=generator)]
    return torch.cat(shuffled + list(batches[full:]))
