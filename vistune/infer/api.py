"""The OpenAI chat-completions wire format: request schemas, message parsing, errors, responses, chunks.

Requests are validated field by field and unknown fields are refused, so a client that relies on a
feature this server lacks (tools, logprobs, several choices) hears so instead of getting an answer that
silently ignored it. Each message becomes a `Turn` that says how many images it holds; a user message's
image parts become one `<image>` placeholder each, in front of the message's text (LLaVA's training
layout, and vLLM's for templates that know no images), and an `<image>` typed in text stays text.
Every error is an `APIError`, rendered in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`.

`parse_request` reads a body (in a worker thread, not on the event loop): the number of messages and the
size of the text are capped before the JSON is parsed (from the `"role"` keys in the raw bytes, and from
the bytes outside data URIs) and again exactly after, so that a body of a million tiny messages or of 30 MB
of text is refused without building it.
"""

from __future__ import annotations

import email.message
import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vistune.data.records import IMAGE_PLACEHOLDER, Turn

MAX_STOP_STRINGS = 4  # OpenAI's own limit
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error for the client: HTTP status, a message in plain words, the offending field (`param`)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    # Unknown fields are refused, and so are values of the wrong JSON type (`"stream": "yes"` is not true,
    # `"max_tokens": true` is not 1); an integer is still a number where a float is expected.
    model_config = ConfigDict(extra="forbid", strict=True)


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"  # accepted; the tower's input size is fixed


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]


class StreamOptions(_Strict):
    include_usage: bool = False


class ResponseFormat(_Strict):
    type: Literal["text"]


class ChatRequest(_Strict):
    """`POST /v1/chat/completions`: the fields this server understands; any other is refused."""

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = 0.0  # only 0 (no penalty) is supported
    frequency_penalty: float = 0.0
    logprobs: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None  # an end-user id for the client's own bookkeeping; not used


@dataclass(frozen=True)
class ImageRef:
    """An image part: its URL and where it sits in the request (for error messages)."""

    url: str
    param: str


def _is_json(content_type: str | None) -> bool:
    """Whether a Content-Type names JSON (absent: taken as JSON), as FastAPI reads a JSON body."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    kind, subtype = message.get_content_maintype(), message.get_content_subtype()
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


def _too_many_messages(count: int, limit: int) -> APIError:
    return APIError(
        400, f"{count} messages in one request, over this server's limit of {limit} (--max-messages)",
        "messages", "too_many_messages",
    )  # fmt: skip


def _text_bytes(body: bytes, most: int = 64) -> int:
    """Bytes of a raw body outside its first `most` data URIs (an upper bound on its text in JSON)."""
    outside, start = len(body), 0
    for _ in range(most):
        start = body.find(b'"data:', start)
        end = body.find(b'"', start + 1) if start >= 0 else -1
        if end < 0:
            break
        outside -= end - start
        start = end
    return outside


def _too_much_text(size: int, max_chars: int) -> APIError:
    return APIError(
        400, f"the body holds {size} bytes besides its images, more than {max_chars} characters of text "
        "take (--max-prompt-chars)", "messages", "context_length_exceeded",
    )  # fmt: skip


def parse_request(
    body: bytes, content_type: str | None, max_messages: int, max_chars: int | None = None
) -> ChatRequest:
    """The request a body holds, checked field by field; APIError (400) naming what is wrong.

    Before the JSON is parsed: at most `max_messages` `"role"` keys, and, with `max_chars`, at most what
    that many characters of text can take in JSON (12 bytes each, as escaped surrogate pairs) plus the
    messages' own keys, outside data URIs."""
    from vistune.infer.guards import validation_error  # guards imports this module

    if not body:
        raise validation_error([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    if not _is_json(content_type):
        raise validation_error([{"type": "model_attributes_type", "loc": ("body",), "msg": ""}])
    if body.count(b'"role"') > max_messages:  # counted before the JSON is parsed: an upper bound
        raise _too_many_messages(body.count(b'"role"'), max_messages)
    if max_chars is not None and len(body) > (room := 12 * max_chars + 256 * max_messages + 65536):
        if (size := _text_bytes(body)) > room:
            raise _too_much_text(size, max_chars)
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as err:
        raise validation_error([{"type": "json_invalid", "loc": ("body", err.pos), "msg": err.msg}]) from None
    except UnicodeDecodeError:
        raise APIError(400, "the body is not valid JSON (it is not UTF-8 text)") from None
    except RecursionError:
        raise APIError(400, "the body is not valid JSON (nested too deeply to read)") from None
    messages = payload.get("messages") if isinstance(payload, dict) else None
    if isinstance(messages, list) and len(messages) > max_messages:
        raise _too_many_messages(len(messages), max_messages)
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as err:
        errors = [e | {"loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]
        raise validation_error(errors) from None


def check_request(req: ChatRequest, model_name: str) -> None:
    """Refuse what the schema cannot say: another model, several choices, unsupported sampling knobs."""
    if req.model != model_name:
        raise APIError(
            404, f"the model {req.model!r} does not exist here; this server serves {model_name!r}",
            "model", "model_not_found",
        )  # fmt: skip
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server returns one choice (n=1)", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) != 0:
            raise APIError(400, f"{name} is not supported (only 0)", name)
    if req.logprobs:
        raise APIError(400, "logprobs are not supported", "logprobs")
    if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
        raise APIError(400, "max_tokens and max_completion_tokens disagree; send one", "max_tokens")
    stops = stop_strings(req)
    if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
        raise APIError(400, f"stop takes 1 to {MAX_STOP_STRINGS} non-empty strings", "stop")


def stop_strings(req: ChatRequest) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def requested_max_tokens(req: ChatRequest) -> int | None:
    return req.max_completion_tokens or req.max_tokens


def text_characters(messages: list[Message]) -> int:
    """The characters of text in the messages (image parts not counted)."""
    return sum(
        len(m.content) if isinstance(m.content, str)
        else sum(len(p.text) for p in m.content if isinstance(p, TextPart))
        for m in messages
    )  # fmt: skip


def to_turns(messages: list[Message]) -> tuple[list[Turn], list[ImageRef]]:
    """Messages -> turns (`developer` is a system turn) and the image parts in order of appearance."""
    turns: list[Turn] = []
    refs: list[ImageRef] = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if isinstance(message.content, str):
            text, images = message.content, []
        else:
            text = "\n".join(p.text for p in message.content if isinstance(p, TextPart))
            images = [
                ImageRef(p.image_url.url, f"messages[{i}].content[{j}].image_url.url")
                for j, p in enumerate(message.content)
                if isinstance(p, ImagePart)
            ]
        if images and role != "user":
            raise APIError(
                400, f"images are accepted in user messages only, not in a {role} message", images[0].param
            )
        # The turn says how many images it holds: an `<image>` typed in any text stays text.
        turns.append(Turn(role, f"{IMAGE_PLACEHOLDER}\n" * len(images) + text, len(images)))
        refs += images
    return turns, refs


def new_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion(id_: str, model: str, text: str, finish: str, usage_: dict) -> dict:
    """A whole `chat.completion` object."""
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish,
        "logprobs": None,
    }
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [choice], "usage": usage_, "system_fingerprint": None,
    }  # fmt: skip


def chunk(id_: str, model: str, delta: dict, finish: str | None = None, usage_: dict | None = None) -> dict:
    """One `chat.completion.chunk`; with `usage_` the final usage chunk (no choices), as OpenAI sends it."""
    choices = [] if usage_ else [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    body = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model}
    return body | {"choices": choices} | ({"usage": usage_} if usage_ else {})
