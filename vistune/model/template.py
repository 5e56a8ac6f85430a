"""Render a conversation to token ids and loss labels in one pass, from the LLM's own chat template.

How it stays exact where other tools guess: the template is rendered once with every message's
content replaced by a sentinel, so we know which characters the template wrote (role headers,
control tokens) and which are message content. Template text is tokenized with special tokens
recognised; message content is tokenized with special tokens split into plain text, so a user who types
`<|im_end|>` or `<image>` gets ordinary text tokens. Each declared image's `<image>` placeholder becomes
`image_tokens` copies of the image token id. An assistant turn's labels cover its content and the
template's end-of-turn text (what the template writes after the turn when the conversation ends there),
so the model learns to stop. The template is rendered a fixed number of times whatever the length of the
conversation, so rendering takes time linear in the number of turns. Any disagreement between the
template and these assumptions is a hard error naming the record.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from vistune.data.records import CHATML, IMAGE_PLACEHOLDER, Turn

IGNORE = -100
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")

# ChatML without a default system prompt (`vistune.data.records.CHATML`): SmolLM2's own template injects
# one ("You are a helpful AI assistant named SmolLM...") into every conversation, ~20 tokens per sample.
NAMED_TEMPLATES = {"chatml": CHATML}


class RenderError(ValueError):
    """A conversation that cannot be rendered faithfully; the message names the record."""


@dataclass
class Rendered:
    """Token ids, labels (IGNORE where no loss) and how many images the ids expect, in order."""

    input_ids: list[int]
    labels: list[int]
    num_images: int

    @property
    def num_label_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def set_chat_template(tokenizer: PreTrainedTokenizerBase, template: str | None) -> None:
    """Override the tokenizer's chat template by name (`chatml`) or with a Jinja string."""
    if template:
        tokenizer.chat_template = NAMED_TEMPLATES.get(template, template)


def _template(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)


def _segments(
    tokenizer: PreTrainedTokenizerBase, turns: list[Turn], generation: bool, where: str
) -> list[tuple[str, int | None, bool]]:
    """Split the rendered template into (text, turn index or None for template text, labelled)."""
    masked = [{"role": t.role, "content": _SENTINEL.format(i)} for i, t in enumerate(turns)]
    full = _template(tokenizer, masked, generation)
    closing = _closings(tokenizer, masked, full, where)
    pieces: list[tuple[str, int | None, bool]] = []
    pos, previous = 0, None
    for match in _SENTINEL_RE.finditer(full):
        i = int(match.group(1))
        pieces += _template_piece(full[pos : match.start()], closing.get(previous, 0))
        pieces.append((turns[i].content, i, turns[i].role == "assistant"))
        pos, previous = match.end(), i
    pieces += _template_piece(full[pos:], closing.get(previous, 0))
    if sorted(p[1] for p in pieces if p[1] is not None) != list(range(len(turns))):
        raise RenderError(f"{where}: the chat template dropped or repeated message contents")
    return pieces


def _closing(tokenizer: PreTrainedTokenizerBase, masked: list[dict], i: int, full: str, where: str) -> str:
    """The template text that closes turn `i` when the conversation ends there (rendered up to it)."""
    upto = _template(tokenizer, masked[: i + 1], False)
    if not full.startswith(upto):
        raise RenderError(f"{where}: the chat template is not prefix-stable at turn {i}; cannot mask")
    mark = _SENTINEL.format(i)
    return upto[upto.rindex(mark) + len(mark) :]


def _closings(
    tokenizer: PreTrainedTokenizerBase, masked: list[dict], full: str, where: str
) -> dict[int, int]:
    """{assistant turn: length of the template text that closes it}, in time linear in the conversation.

    The closing text is what the template writes after the turn when the conversation ends there.
    Rendering every prefix would cost time quadratic in the number of turns, so only the first and the
    last assistant turns are rendered as ends; when they agree (templates that close every turn alike:
    ChatML, Llama-3, ...) and the full rendering has that text after every assistant turn, it closes
    them all. Other templates get every prefix rendered (bounded by the caller's message count).
    """
    assistants = [i for i, m in enumerate(masked) if m["role"] == "assistant"]
    if not assistants:
        return {}
    ends = {i: _closing(tokenizer, masked, i, full, where) for i in {assistants[0], assistants[-1]}}
    texts = set(ends.values())
    if len(texts) == 1:
        (text,) = texts
        after = {int(m.group(1)): m.end() for m in _SENTINEL_RE.finditer(full)}
        if all(full.startswith(text, after.get(i, len(full))) for i in assistants):
            return dict.fromkeys(assistants, len(text))
    return {i: len(ends.get(i) or _closing(tokenizer, masked, i, full, where)) for i in assistants}


def _faithful_segments(
    tokenizer: PreTrainedTokenizerBase, turns: list[Turn], generation: bool, where: str
) -> list[tuple[str, int | None, bool]]:
    """`_segments`, checked against the template rendered with the real contents.

    Templates that transform contents (Llama-3's `content | trim`) would otherwise be trained on text
    they never produce; trimming is replayed here, any other change is an error.
    """
    real = _template(tokenizer, [{"role": t.role, "content": t.content} for t in turns], generation)
    for attempt in (turns, [dataclasses.replace(t, content=t.content.strip()) for t in turns]):
        pieces = _segments(tokenizer, attempt, generation, where)
        if "".join(p[0] for p in pieces) == real:
            return pieces
    raise RenderError(f"{where}: the chat template changes message contents (beyond trimming); cannot mask")


def _template_piece(text: str, labelled: int) -> list[tuple[str, int | None, bool]]:
    """Template text; its first `labelled` characters close an assistant turn and carry loss."""
    return [p for p in ((text[:labelled], None, True), (text[labelled:], None, False)) if p[0]]


def render(
    turns: list[Turn],
    tokenizer: PreTrainedTokenizerBase,
    *,
    image_tokens: int,
    num_images: int,
    generation: bool = False,
    where: str = "conversation",
) -> Rendered:
    """Render `turns` to ids and labels.

    Args:
        turns: the conversation; for generation it must end with a user turn.
        image_tokens: image-token positions per image (what the projector outputs).
        num_images: images attached; the first `num_images` `<image>` placeholders in user turns
            become image tokens, any others stay plain text. Where turns say how many images they
            hold (`Turn.images`), exactly that many leading placeholders of each turn do.
        generation: append the assistant header so the model continues with its answer.
        where: the record's name, for error messages.
    """
    _check_roles(turns, generation, where)
    for k, turn in enumerate(turns):  # the tokenizer cannot encode them (it raises a TypeError)
        if any("\ud800" <= ch <= "\udfff" for ch in turn.content):
            raise RenderError(
                f"{where}: turn {k} ({turn.role}) is not valid Unicode: it holds a lone surrogate (bytes "
                "that were not UTF-8, or a \\ud800-style escape)"
            )
    segments = _faithful_segments(tokenizer, turns, generation, where)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    ids: list[int] = []
    labels: list[int] = []
    images_left = num_images
    per_turn = any(t.images is not None for t in turns)
    for text, turn, labelled in segments:
        if turn is None:
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            allow = images_left if turns[turn].role == "user" else 0
            if per_turn:
                allow = min(allow, turns[turn].images or 0)
            piece, used = _content_ids(tokenizer, text, allow, image_id, image_tokens)
            if per_turn and used != (turns[turn].images or 0):
                raise RenderError(
                    f"{where}: turn {turn} holds {turns[turn].images} image(s) but {used} placeholder(s)"
                )
            images_left -= used
        ids += piece
        labels += piece if labelled else [IGNORE] * len(piece)
    if images_left:
        raise RenderError(
            f"{where}: {num_images} image(s) but only {num_images - images_left} {IMAGE_PLACEHOLDER} "
            "placeholder(s) in user turns"
        )
    return Rendered(ids, labels, num_images)


def _content_ids(
    tokenizer: PreTrainedTokenizerBase, text: str, allow: int, image_id: int, image_tokens: int
) -> tuple[list[int], int]:
    """Tokenize message content as plain text, expanding up to `allow` image placeholders."""
    parts = text.split(IMAGE_PLACEHOLDER, allow) if allow else [text]
    ids: list[int] = []
    for k, part in enumerate(parts):
        if k:
            ids += [image_id] * image_tokens
        if part:
            ids += tokenizer(part, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return ids, len(parts) - 1


def _check_roles(turns: list[Turn], generation: bool, where: str) -> None:
    """user/assistant alternate after an optional leading system turn; the last speaker fits the use."""
    body = turns[1:] if turns and turns[0].role == "system" else turns
    if not body:
        raise RenderError(f"{where}: no user turn")
    for k, turn in enumerate(body):
        expected = "user" if k % 2 == 0 else "assistant"
        if turn.role != expected:
            raise RenderError(f"{where}: turn {k} has role {turn.role!r}, expected {expected!r}")
    last = body[-1].role
    if generation and last != "user":
        raise RenderError(f"{where}: generation needs the conversation to end with a user turn")
    if not generation and last != "assistant":
        raise RenderError(f"{where}: training needs the conversation to end with an assistant turn")
