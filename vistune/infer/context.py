"""The context-length check shared by `vistune serve` and `vistune chat`: a prompt and the tokens asked
for must fit the model's context, and nothing is ever cut silently.

`token_budget` says how many new tokens a prompt leaves room for, or raises a `ContextError` naming
what to change: the conversation (`messages`) or the number of tokens asked for.
"""

from __future__ import annotations


class ContextError(ValueError):
    """A prompt (with the new tokens asked for) that does not fit; `param` is what to change."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def context_length(config: object) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), or None when it does not say."""
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def token_budget(
    prompt_tokens: int,
    asked: int | None,
    context: int | None,
    *,
    prompt_limit: int | None = None,
    limit_name: str = "the model's context length",
    asked_name: str = "max_tokens",
    shorten: str = "shorten the conversation",
) -> int | None:
    """The new tokens a prompt of `prompt_tokens` leaves room for (None: the context is unknown).

    Raises ContextError when the prompt is over `prompt_limit` (default: the context), when it leaves
    no room to answer, or when `asked` new tokens do not fit after it.
    """
    limit = prompt_limit or context
    if limit is not None and prompt_tokens > limit:
        raise ContextError(
            f"the prompt is {prompt_tokens} tokens (images included), over the limit of {limit} "
            f"({limit_name}); {shorten}",
            "messages",
        )
    if context is None:
        return None
    room = context - prompt_tokens
    if room < 1 or (asked or 0) > room:
        why = f"and {asked_name}={asked} need more than" if asked else "leave no room to answer in"
        raise ContextError(
            f"the prompt's {prompt_tokens} tokens {why} the model's context ({context} tokens)",
            asked_name if asked else "messages",
        )
    return room
