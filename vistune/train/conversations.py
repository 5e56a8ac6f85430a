"""Conversation data for the `vlm` stage: records rendered to ids/labels once, then batched.

Every record is checked (by the check `vistune data validate` makes: `validate.select_checked`) and
rendered up front, so problems surface before training starts: a bad record stops the run naming its
file and id (or, with `on_bad_record: skip`, is counted and skipped), and an over-long record is cut
after its last image token when that keeps some answer tokens, else dropped and counted. Truncation
never cuts through image tokens. Images are decoded in full by that check (as `load_image` decodes them
when their batch is built; each file once, however many records share it), so a record whose image
training could not load is caught here, and with `skip` it never reaches a batch, in this run or a
resumed one.

A micro-batch is right-padded rows, one record each (`collate`), or with `pack: true` several records
per row (`collate_packed`): first-fit by length into rows of `pack_length` tokens, with position ids
that restart at 0 for each record, from which transformers keeps attention inside each record.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from vistune.config import DataSpec
from vistune.data.records import Record
from vistune.data.validate import select_checked
from vistune.model.llm import image_token_id
from vistune.model.template import IGNORE, RenderError, render


@dataclass
class Sample:
    """One rendered record: ids, labels and the image files its image tokens stand for."""

    input_ids: list[int]
    labels: list[int]
    images: list[Path]
    where: str


class ConversationData(torch.utils.data.Dataset):
    """All records of a stage's datasets, rendered; `counts` says what was kept, skipped, cut, dropped."""

    def __init__(
        self,
        specs: list[DataSpec],
        tokenizer: PreTrainedTokenizerBase,
        image_tokens: int,
        max_length: int,
        on_bad_record: str = "raise",
    ):
        self.samples: list[Sample] = []
        self.counts: Counter[str] = Counter()
        self._checked: dict = {}  # validation's cache: each image file decoded once
        for spec in specs:
            records, skipped = select_checked(spec, on_bad_record, self._checked)  # as `validate` checks
            if skipped:
                self.counts["skipped_bad"] += skipped
            for record in records:
                self._add(record, spec, tokenizer, image_tokens, max_length, on_bad_record)
        del self._checked
        if not self.samples:
            raise ValueError(f"no usable records in {[s.path for s in specs]} ({dict(self.counts)})")

    def _add(self, record: Record, spec: DataSpec, tokenizer, image_tokens, max_length, on_bad) -> None:
        root = Path(spec.image_root or Path(spec.path).parent)
        try:
            out = render(
                record.turns, tokenizer, image_tokens=image_tokens, num_images=len(record.images),
                where=record.where(),
            )  # fmt: skip
        except RenderError:
            if on_bad == "raise":
                raise
            self.counts["skipped_bad"] += 1
            return
        ids, labels = out.input_ids, out.labels
        if len(ids) > max_length:
            ids, labels = _truncate(ids, labels, max_length, tokenizer)
            self.counts["cut" if ids else "dropped_too_long"] += 1
            if not ids:
                return
        self.counts["kept"] += 1
        self.samples.append(Sample(ids, labels, [root / p for p in record.images], record.where()))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Sample:
        return self.samples[index]

    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.samples)


def _truncate(ids: list[int], labels: list[int], max_length: int, tokenizer) -> tuple[list[int], list[int]]:
    """Cut after `max_length` tokens unless that cuts image tokens or leaves no answer token."""
    image_id = image_token_id(tokenizer)
    last_image = max((i for i, t in enumerate(ids) if t == image_id), default=-1)
    if last_image >= max_length or all(label == IGNORE for label in labels[1:max_length]):
        return [], []
    return ids[:max_length], labels[:max_length]


def pack_rows(samples: list[Sample], budget: int) -> list[list[int]]:
    """Positions of `samples` grouped into rows of at most `budget` tokens: first-fit decreasing (each
    record, longest first, goes into the first row with room), a pure function of the lengths.

    A record longer than `budget` cannot be packed: the error names it (a stage's config keeps
    `pack_length` at least `max_length`, and records are cut to `max_length`, so training never sees it).
    """
    rows: list[list[int]] = []
    room: list[int] = []
    for k in sorted(range(len(samples)), key=lambda k: -len(samples[k].input_ids)):  # stable on ties
        n = len(samples[k].input_ids)
        if n > budget:
            raise ValueError(f"{samples[k].where}: {n} tokens do not fit a packed row of {budget}")
        row = next((r for r, free in enumerate(room) if free >= n), len(rows))
        if row == len(rows):
            rows.append([])
            room.append(budget)
        rows[row].append(k)
        room[row] -= n
    return rows


def collate_packed(samples: list[Sample], pad_id: int, budget: int) -> dict:
    """`collate` with several records per row (`pack_rows`): (R, W) ids and labels and (R, W) position ids
    that restart at 0 for each record, and for the padding after a row's last record, so that
    transformers masks attention to each record (no attention mask is passed).

    The first label of each record is ignored: the token before it belongs to another record (unpacked,
    a row's first label has no predecessor either). Images are listed in the order of their tokens in
    the flattened rows, which is the order the model scatters their features in.
    """
    rows = [[samples[k] for k in row] for row in pack_rows(samples, budget)]
    width = max(sum(len(s.input_ids) for s in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[r, start : start + n] = torch.tensor(s.input_ids)
            labels[r, start + 1 : start + n] = torch.tensor(s.labels[1:])
            mask[r, start : start + n] = 1
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(width - start)  # the padding: a sequence of its own
    images = [path for row in rows for s in row for path in s.images]
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "position_ids": positions}
    return out | {"images": images}


def collate(samples: list[Sample], pad_id: int) -> dict:
    """Right-pad ids/labels into tensors; images stay as paths (loaded or cached by the caller)."""
    width = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(samples), width), dtype=torch.long)
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[row, :n] = torch.tensor(s.input_ids)
        labels[row, :n] = torch.tensor(s.labels)
        mask[row, :n] = 1
    images = [path for s in samples for path in s.images]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "images": images}
