"""XLNet's permutation language modelling for the text encoder: the `plm` stage kind.

Blocks of `max_length` tokens (the stage's documents joined by `[SEP]`). For each block a random order of
its positions is drawn (XLNet's factorisation order z), and the last round(predict x max_length) positions
in that order are predicted, each from those before it in the order, wherever they stand in the text.
Two-stream attention (Yang et al., 2019, section 2.3) makes that one pass (`permutation_masks`):

    content stream h_i: sees the content of every j with rank(j) <= rank(i), itself included
    query stream  g_t:  starts from a learned vector at t's position; sees the content of every j with
                        rank(j) < rank(t): where t stands and what came before it, never t's own token

Both streams use the same weights (`ScratchForPreTraining.two_stream`); a target's token is predicted
from its query stream through the output layer tied to the embeddings. The figure is the perplexity of
the targets (`ppl`); it is lower than a left-to-right perplexity on the same text, since targets see
context on both sides.

What this leaves out of XLNet: Transformer-XL's memory of the previous segment and relative position
encodings (positions here are rotary, which attention also reads as relative, or learned), and the
released code's choice of targets as spans of consecutive tokens, with every other token in the context
of every target; here the order is a uniform permutation of all positions, as in the paper's equations,
so tokens early in the order see little.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from vistune.config import Stage
from vistune.model.scratch import ScratchForPreTraining
from vistune.model.vlm import VLM
from vistune.train.objective import Batcher, StageContext
from vistune.train.text import EncoderObjective, blocks, encoder_parts, row_batch, token_stream


def permutation_masks(
    rows: int, length: int, predict: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random order of each row's positions (drawn on the default CPU generator) as two-stream masks.

    Returns targets (rows, predict): the positions last in the order, in order; content (rows, 1, L, L):
    query i may see key j when rank(j) <= rank(i); query (rows, 1, predict, L): target t may see key j when
    rank(j) < rank(t)."""
    order = torch.rand(rows, length).argsort(dim=-1)  # order[b, k]: the position at rank k
    rank = order.argsort(dim=-1)  # rank[b, i]: where position i comes in the order
    targets = order[:, length - predict :]
    content = rank[:, None, :] <= rank[:, :, None]
    query = rank[:, None, :] < rank.gather(1, targets)[:, :, None]
    return targets, content[:, None], query[:, None]


class PLMObjective(EncoderObjective):
    """Cross-entropy of the query stream's predictions of each block's last tokens in a random order."""

    def __init__(self, encoder: ScratchForPreTraining, tokenizer: PreTrainedTokenizerBase, rows: torch.Tensor,
                 predict: float, device: torch.device, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(encoder, tokenizer, device, **kwargs)
        self.rows = rows
        self.predict = max(1, min(rows.shape[1] - 1, round(predict * rows.shape[1])))

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict[str, Any]:
        return {"blocks": len(self.rows), "tokens": self.rows.numel(), "predicted_per_block": self.predict}

    def batcher(self) -> Batcher:
        return functools.partial(row_batch, self.rows)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["ids"]) * self.predict

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["ids"]
        targets, content, query = (m.to(ids.device) for m in permutation_masks(*ids.shape, self.predict))
        states = self.encoder.two_stream(ids, content, targets, query)  # (B, P, D)
        logits = self.encoder.lm_head(states).flatten(0, 1).float()
        loss = F.cross_entropy(logits, ids.gather(1, targets).flatten(), reduction="sum")
        self.tally.add("loss", loss, len(logits))
        return loss

    def health(self) -> tuple[dict[str, float], str | None]:
        """The perplexity of the predicted tokens since the last log step."""
        loss = self.tally.read().get("loss")
        return ({} if loss is None else {"ppl": float(torch.tensor(min(loss, 50.0)).exp())}), None


def plm_stage(stage: Stage, model: VLM, ctx: StageContext) -> PLMObjective:
    """A run's `plm` stage: its encoder on blocks of its documents (the VLM takes no part)."""
    encoder, tokenizer, texts, save_to = encoder_parts(stage, ctx)
    rows = blocks(token_stream(texts, tokenizer, tokenizer.sep_token_id), stage.max_length)
    return PLMObjective(
        encoder,
        tokenizer,
        rows,
        stage.options.predict,
        torch.device(ctx.device),
        save_to=save_to,
        holds=model,
    )
