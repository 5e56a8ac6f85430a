"""The in-memory record every reader yields and every consumer (training, eval, inspect) reads.

A record is one conversation, optionally about images, normalised from whatever format it came from:
roles are `system`, `user` or `assistant`; `images` are paths relative to an image root, in the order
their `<image>` placeholders appear in the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<image>"
# ChatML without a system prompt: the chat layout `vistune.model.template` names `chatml`, and the one the
# tokenizers vistune trains itself carry (`vistune.data.vocab`).
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
ROLES = ("system", "user", "assistant")
# Role names accepted on input, mapped to ours (LLaVA uses human/gpt, OpenAI-style files user/assistant).
ROLE_ALIASES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Turn:
    """One message of a conversation.

    `images`: how many images this turn holds, as its first `<image>` placeholders (a chat session
    knows); None for records read from files, where the record's images take the first placeholders
    of the conversation's user turns.
    """

    role: str
    content: str
    images: int | None = None


@dataclass
class Record:
    """One training or evaluation example.

    Attributes:
        id: the record's id in its source file (used in every error message).
        images: image paths relative to the image root, one per `<image>` placeholder, in text order.
        turns: the conversation.
        meta: extra fields from the source (question_type, answers, label, pope_setting, ...).
        source: the file the record came from, for error messages.
    """

    id: str
    images: list[str]
    turns: list[Turn]
    meta: dict = field(default_factory=dict)
    source: str = ""

    def where(self) -> str:
        """Say where this record lives, for error messages: 'FILE record ID'."""
        return f"{self.source or '<memory>'} record {self.id!r}"
