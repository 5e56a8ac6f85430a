"""BERT's two pretraining objectives for the text encoder: the `mlm` and `nsp` stage kinds.

`mlm`, masked language modelling: blocks of `max_length` tokens (`[CLS]` + the stage's documents, joined
by `[SEP]`, + `[SEP]`). In each block, as in BERT's data builder, round(mask_prob x (max_length - 2)) of
the tokens that are not special are chosen to be predicted; of those, 80% are replaced by `[MASK]`, 10%
by a random token and 10% kept as they are (`mask_tokens`). The loss is the cross-entropy of the chosen
tokens, the figure the share of them predicted right (`masked_acc`).

`nsp`, next-sentence prediction: pairs `[CLS] A [SEP] B [SEP]` of two spans of sentences
(`vistune.data.texts.sentences`), A followed in its document by B (IsNext) or by a span that starts at
a random sentence of another document (NotNext), each side whole sentences up to half of `max_length`
(`SentencePairs.encode`). Example 2i pairs the i-th sentence that has a successor with it, example
2i + 1 with a random one (its draw seeded by the run's seed and i), so
exactly half of every epoch's pairs are random. A linear head on `[CLS]`'s state says which; the figure
is its accuracy (`nsp_acc`). As in BERT, segment embeddings tell A's tokens (with `[CLS]` and the first
`[SEP]`) from B's.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.nn import functional as F
from transformers import PreTrainedTokenizerBase

from vistune.config import Stage
from vistune.data.texts import sentences
from vistune.model.scratch import ScratchForPreTraining
from vistune.model.vlm import VLM
from vistune.train.objective import Batcher, StageContext
from vistune.train.text import EncoderObjective, blocks, encoder_parts, row_batch, token_stream


def mask_tokens(
    ids: torch.Tensor, special: torch.Tensor, chosen: int, mask_id: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking of (B, L) token ids: (inputs, (B, chosen) positions to predict).

    In each row `chosen` positions where `special` is False are picked; 80% of them become `mask_id`,
    10% a random token, 10% stay. Every draw is made on the default CPU generator, for every position."""
    scores = torch.rand(ids.shape).to(ids.device).masked_fill(special, 2.0)  # specials sort last
    positions = scores.argsort(dim=-1)[:, :chosen]  # (B, chosen)
    draw = torch.rand(positions.shape).to(ids.device)
    random_ids = torch.randint(vocab_size, positions.shape).to(ids.device)
    picked = ids.gather(1, positions)
    replaced = torch.where(draw < 0.8, mask_id, torch.where(draw < 0.9, random_ids, picked))
    return ids.scatter(1, positions, replaced), positions


class MLMObjective(EncoderObjective):
    """Masked-token cross-entropy of the encoder on (B, max_length) blocks."""

    def __init__(self, encoder: ScratchForPreTraining, tokenizer: PreTrainedTokenizerBase, rows: torch.Tensor,
                 mask_prob: float, device: torch.device, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(encoder, tokenizer, device, **kwargs)
        self.rows = rows
        self.chosen = max(1, round(mask_prob * (rows.shape[1] - 2)))
        self.special_ids = torch.tensor(tokenizer.all_special_ids)

    def __len__(self) -> int:
        return len(self.rows)

    def describe(self) -> dict[str, Any]:
        return {"blocks": len(self.rows), "tokens": self.rows.numel(), "masked_per_block": self.chosen}

    def batcher(self) -> Batcher:
        return functools.partial(row_batch, self.rows)

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["ids"]) * self.chosen

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = batch["ids"]
        special = torch.isin(ids, self.special_ids.to(ids.device))
        inputs, positions = mask_tokens(
            ids, special, self.chosen, self.tokenizer.mask_token_id, len(self.tokenizer)
        )
        hidden = self.encoder(inputs).gather(
            1, positions[..., None].expand(-1, -1, self.encoder.config.hidden_size)
        )
        logits = self.encoder.lm_head(hidden).flatten(0, 1).float()
        targets = ids.gather(1, positions).flatten()
        loss = F.cross_entropy(logits, targets, reduction="sum")
        self.tally.add("loss", loss, len(targets))
        self.tally.add("masked_acc", (logits.argmax(-1) == targets).sum(), len(targets))
        return loss


def mlm_blocks(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, length: int) -> torch.Tensor:
    """(N, length) rows `[CLS] tokens [SEP]`: the documents joined by `[SEP]`, cut into pieces."""
    body = blocks(token_stream(texts, tokenizer, tokenizer.sep_token_id), length - 2)
    n = len(body)
    return torch.cat(
        [torch.full((n, 1), tokenizer.cls_token_id), body, torch.full((n, 1), tokenizer.sep_token_id)], 1
    )


def mlm_stage(stage: Stage, model: VLM, ctx: StageContext) -> MLMObjective:
    """A run's `mlm` stage: its encoder on its documents (the VLM takes no part)."""
    encoder, tokenizer, texts, save_to = encoder_parts(stage, ctx)
    rows = mlm_blocks(texts, tokenizer, stage.max_length)
    return MLMObjective(
        encoder,
        tokenizer,
        rows,
        stage.options.mask_prob,
        torch.device(ctx.device),
        save_to=save_to,
        holds=model,
    )


class SentencePairs:
    """The NSP examples: 2 per sentence that has a successor in its document, the second one random.

    A host part (`batch`) too: it holds token ids only, so DataLoader workers can run it."""

    def __init__(self, texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, max_length: int, seed: int):
        units = [(d, s) for d, text in enumerate(texts) for s in sentences(text)]
        self.doc = [d for d, _ in units]
        self.ids = tokenizer([s for _, s in units], add_special_tokens=False)["input_ids"]
        self.firsts = [i for i in range(len(units) - 1) if self.doc[i] == self.doc[i + 1]]
        if not self.firsts or len(set(self.doc)) < 2:
            raise ValueError(
                "next-sentence prediction needs two documents and a sentence followed by another"
            )
        self.cls, self.sep, self.pad = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        self.max_length, self.seed = max_length, seed

    def __len__(self) -> int:
        return 2 * len(self.firsts)

    def pair(self, index: int) -> tuple[int, int, bool]:
        """(A, B, whether B follows A) of example `index`: sentence indices."""
        a = self.firsts[index // 2]
        if index % 2 == 0:
            return a, a + 1, True
        draw = random.Random(self.seed * 1_000_003 + index)  # the same pair in every epoch and process
        while True:
            b = draw.randrange(len(self.ids))
            if self.doc[b] != self.doc[a]:
                return a, b, False

    def encode(self, a: int, b: int) -> list[int]:
        """`[CLS] A [SEP] B [SEP]`: A the sentences of a's document that end with a, B those of b's that start
        with b, each side whole sentences up to half the room (as BERT's segments are spans of text, not
        single sentences), then the longer side cut first until the pair fits `max_length`."""
        room, ids, doc = self.max_length - 3, self.ids, self.doc
        first, i = list(ids[a]), a - 1
        while i >= 0 and doc[i] == doc[a] and len(first) + len(ids[i]) <= room // 2:
            first, i = ids[i] + first, i - 1
        second, j = list(ids[b]), b + 1
        while j < len(doc) and doc[j] == doc[b] and len(second) + len(ids[j]) <= room // 2:
            second, j = second + ids[j], j + 1
        while len(first) + len(second) > room:
            first, second = (first[:-1], second) if len(first) >= len(second) else (first, second[:-1])
        return [self.cls, *first, self.sep, *second, self.sep]

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """(B, L) right-padded pairs, their attention mask, segments (0: `[CLS] A [SEP]`, 1: `B [SEP]`)
        and (B,) labels (1: B follows A)."""
        pairs = [self.pair(i) for i in indices]
        rows = [self.encode(a, b) for a, b, _ in pairs]
        width = max(map(len, rows))
        ids = torch.tensor([row + [self.pad] * (width - len(row)) for row in rows])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
        types = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            types[i, row.index(self.sep) + 1 : len(row)] = 1
        labels = torch.tensor([int(n) for _, _, n in pairs])
        return {"ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": labels}


class NSPObjective(EncoderObjective):
    """Cross-entropy of the encoder's IsNext / NotNext head over sentence pairs."""

    def __init__(self, encoder: ScratchForPreTraining, tokenizer: PreTrainedTokenizerBase,
                 pairs: SentencePairs, device: torch.device, **kwargs: Any) -> None:  # fmt: skip
        super().__init__(encoder, tokenizer, device, **kwargs)
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self) -> dict[str, Any]:
        return {"pairs": len(self.pairs), "sentences": len(self.pairs.ids)}

    def batcher(self) -> Batcher:
        return self.pairs.batch

    def count(self, batch: dict[str, Any]) -> int:
        return len(batch["labels"])

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        types = batch["token_type_ids"] if self.encoder.config.type_vocab_size else None
        cls = self.encoder(batch["ids"], batch["attention_mask"], types)[:, 0]  # (B, D): [CLS]'s state
        logits = self.encoder.nsp_head(cls).float()
        loss = F.cross_entropy(logits, batch["labels"], reduction="sum")
        self.tally.add("loss", loss, len(logits))
        self.tally.add("nsp_acc", (logits.argmax(-1) == batch["labels"]).sum(), len(logits))
        return loss


def nsp_stage(stage: Stage, model: VLM, ctx: StageContext) -> NSPObjective:
    """A run's `nsp` stage: its encoder on sentence pairs of its documents (the VLM takes no part)."""
    encoder, tokenizer, texts, save_to = encoder_parts(stage, ctx)
    pairs = SentencePairs(texts, tokenizer, stage.max_length, seed=ctx.seed)
    return NSPObjective(encoder, tokenizer, pairs, torch.device(ctx.device), save_to=save_to, holds=model)
