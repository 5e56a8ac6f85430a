"""Text pretraining on raw text: the `clm` stage kind, and what the encoder kinds (`mlm`, `nsp`, `plm` in
`vistune.train.masked` and `vistune.train.permuted`) share.

`clm` trains the run's LLM (a transformers causal LM or vistune's own decoder) with the next-token
loss on its stage's documents (`vistune.data.texts`), tokenized by the run's tokenizer, each followed by
the tokenizer's end token, joined and cut into blocks of `max_length` tokens (+ 1 for the last target).

The encoder kinds train a text encoder of their own (`ScratchForPreTraining`), new or saved, that the
stage writes to OUT/stages/NAME when it ends: a contrastive stage takes it as its text tower with
`text_tower: stage:NAME`, a later encoder stage goes on training it with `start: stage:NAME`.

Each objective tallies its figure on the device (perplexity, masked-token accuracy, NSP accuracy) and
reports it through `health` at log steps. Random draws (masks, permutations) are made in `forward` from
torch's default CPU generator, which checkpoints save and restore: a resumed run draws what the
uninterrupted one drew.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from vistune.config import EncoderOptions, Stage
from vistune.data.texts import read_all
from vistune.model.scratch import ScratchConfig, ScratchForPreTraining, register_scratch
from vistune.model.vlm import VLM
from vistune.train.objective import Batcher, StageContext, move_to, stage_output

ENCODER_TOKENS = ("pad_token", "cls_token", "sep_token", "mask_token")


class Tally:
    """Sums kept on the device between log steps (no read-back per step): `read` gives their ratios."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor, count: int) -> None:
        """Add `value` (a 0-d tensor) over `count` items to the figure `name`."""
        value, total = value.detach().float(), torch.tensor(float(count), device=value.device)
        old = self.sums.get(name)
        self.sums[name] = torch.stack([value, total]) if old is None else old + torch.stack([value, total])

    def read(self) -> dict[str, float]:
        """Each figure's sum over its count since the last read; then start again."""
        out = {name: s[0].item() / max(s[1].item(), 1.0) for name, s in self.sums.items()}
        self.sums = {}
        return out


def token_stream(texts: Sequence[str], tokenizer: PreTrainedTokenizerBase, separator: int) -> list[int]:
    """Every document's token ids (no special tokens added), each followed by `separator`."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [token for doc in ids for token in (*doc, separator)]


def blocks(stream: Sequence[int], length: int, overlap: int = 0) -> torch.Tensor:
    """(N, length) consecutive windows of a token stream, each starting `length - overlap` after the last."""
    step = length - overlap
    n = (len(stream) - overlap) // step
    if n < 1:
        raise ValueError(f"the text holds {len(stream)} tokens: too few for one block of {length}")
    return torch.tensor(stream[: n * step + overlap]).unfold(0, length, step)


def row_batch(rows: torch.Tensor, indices: list[int]) -> dict[str, Any]:
    """A text objective's host part when its examples are rows of one tensor: {"ids": (B, L)}."""
    return {"ids": rows[indices]}


def causal_loss_sum(llm: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of `llm` over (B, L) blocks: L - 1 targets a row."""
    hidden = llm.get_decoder()(input_ids=ids[:, :-1], use_cache=False).last_hidden_state
    logits = llm.get_output_embeddings()(hidden)
    return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")


class CLMObjective(nn.Module):
    """Next-token loss of a causal LM on blocks of raw text (B, max_length + 1).

    `holds` is any other module a mid-stage checkpoint must restore (the run's VLM, whose LLM this trains)."""

    def __init__(self, llm: PreTrainedModel, rows: torch.Tensor, device: torch.device,
                 holds: nn.Module | None = None) -> None:  # fmt: skip
        super().__init__()
        self.llm, self.rows, self.device, self.holds = llm, rows, device, holds
        self.tally = Tally()
        llm.train()

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        return {"blocks": len(self.rows), "tokens": self.rows.numel()}

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"llm": list(self.llm.parameters())}

    def batcher(self) -> Batcher:
        return functools.partial(row_batch, self.rows)

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def count(self, batch: dict[str, Any]) -> int:
        return batch["ids"][:, 1:].numel()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = causal_loss_sum(self.llm, batch["ids"])
        self.tally.add("loss", loss, self.count(batch))
        return loss

    def health(self) -> tuple[dict[str, float], str | None]:
        """The training perplexity since the last log step."""
        loss = self.tally.read().get("loss")
        return ({} if loss is None else {"ppl": math.exp(min(loss, 50.0))}), None

    def finish(self) -> None:
        """Nothing to hand on: the LLM keeps what it learned."""


def clm_stage(stage: Stage, model: VLM, ctx: StageContext) -> CLMObjective:
    """A run's `clm` stage: the VLM's LLM on its stage's documents, blocks of `max_length` tokens."""
    stream = token_stream(read_all(stage.data), model.tokenizer, model.tokenizer.eos_token_id)
    rows = blocks(stream, stage.max_length + 1, overlap=1)
    return CLMObjective(model.llm, rows, torch.device(ctx.device), holds=model)


def load_encoder(path: str | Path) -> tuple[ScratchForPreTraining, PreTrainedTokenizerBase]:
    """A saved encoder (a stage's OUT/stages/NAME) and its tokenizer."""
    register_scratch()
    try:
        return ScratchForPreTraining.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"{path}: not a text encoder written by an mlm, nsp or plm stage ({err})"
        ) from err


def build_encoder(
    options: EncoderOptions, run_dir: Path, max_length: int
) -> tuple[ScratchForPreTraining, PreTrainedTokenizerBase]:
    """The encoder a stage trains: the saved one `options.start` names, or a new one of `options.encoder`'s
    shape over the tokenizer in `options.tokenizer` (random weights from the default generator)."""
    if options.start is not None:
        return load_encoder(stage_output(options.start, run_dir))
    tokenizer = AutoTokenizer.from_pretrained(options.tokenizer)
    missing = [name for name in ENCODER_TOKENS if getattr(tokenizer, name) is None]
    if missing:
        raise ValueError(f"options.tokenizer {options.tokenizer}: an encoder's tokenizer needs {missing}")
    if options.encoder.get("causal"):
        raise ValueError("options.encoder: an encoder sees both ways; causal must be false")
    # BERT's two segments (sentence A and B of an NSP pair) unless the shape says otherwise
    fields = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "type_vocab_size": 2,
              "max_position_embeddings": max_length} | options.encoder | {"causal": False}  # fmt: skip
    try:
        config = ScratchConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"options.encoder: {err}") from err
    return ScratchForPreTraining(config), tokenizer


class EncoderObjective(nn.Module):
    """What the encoder objectives share: the encoder and its tokenizer, where the stage writes them, the
    parts (`llm`: the encoder and its heads) and the tally of their figures. `holds` is the run's VLM,
    which the stage leaves as it is and its mid-stage checkpoints keep."""

    def __init__(
        self,
        encoder: ScratchForPreTraining,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        save_to: Path | None = None,
        holds: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.encoder, self.tokenizer, self.device, self.save_to = (
            encoder.to(device),
            tokenizer,
            device,
            save_to,
        )
        self.holds = holds  # the run's VLM: not trained here, but a mid-stage checkpoint must restore it
        self.tally = Tally()
        encoder.train()

    def lengths(self) -> None:
        return None

    def parts(self) -> dict[str, list[nn.Parameter]]:
        return {"llm": list(self.encoder.parameters())}

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return move_to(batch, self.device)

    def health(self) -> tuple[dict[str, float], str | None]:
        """The objective's figures since the last log step (the loop logs the loss itself)."""
        figures = self.tally.read()
        figures.pop("loss", None)
        return figures, None

    def finish(self) -> None:
        """Write the encoder and its tokenizer where later stages and `vistune eval` find them."""
        if self.save_to is not None:
            self.encoder.save_pretrained(self.save_to)
            self.tokenizer.save_pretrained(self.save_to)


def encoder_parts(stage: Stage, ctx: StageContext) -> tuple[ScratchForPreTraining, PreTrainedTokenizerBase,
                                                            list[str], Path | None]:  # fmt: skip
    """What an encoder stage starts from: its encoder and tokenizer, its documents, where it writes."""
    encoder, tokenizer = build_encoder(stage.options, ctx.run_dir, stage.max_length)
    save_to = ctx.run_dir / "stages" / stage.name if ctx.is_main else None
    return encoder, tokenizer, read_all(stage.data), save_to
