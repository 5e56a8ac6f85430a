"""Bad inputs to `vistune serve` and its HTTP API: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bad_inputs import (
    SERVED,
    Case,
    Request,
    World,
    _deep,
    gigapixel_png,
    params,
    run_case,
)
from PIL import Image

# --- serve ------------------------------------------------------------------------------------------------


def _body(content: Any = "hi", **fields: Any) -> dict:
    """A chat request with one user message."""
    return {"model": SERVED, "messages": [{"role": "user", "content": content}], "max_tokens": 2} | fields


def _image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _data_uri(data: bytes, mime: str = "image/png") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (30, 160, 50)).save(out, "PNG")
    return out.getvalue()


def _http(
    name: str, status: int, param: str | None, needles: tuple[str, ...], body: Any = None, **request: Any
) -> Case:
    return Case("serve", name, None, 0, needles, request=Request(body, **request), status=status, param=param)


def _serve_cli(name: str, needles: tuple[str, ...], argv: Callable[[Path, World], list[str]]) -> Case:
    return Case("serve", name, lambda tmp, world: ["serve", *argv(tmp, world)], 2, needles)


IMG = "messages[0].content[0].image_url.url"


def serve_cases() -> list[Case]:
    """`vistune serve`: raw HTTP requests answered 4xx in OpenAI's error shape, and bad command lines."""
    png = _png_bytes()
    cut = _png_bytes((64, 64))
    H = _http
    return [
        H("body-not-json", 400, None, ("not valid JSON",), b'{"model": '),
        H("body-not-utf8", 400, None, ("not valid JSON", "UTF-8"), b'{"model": "\xff\xfe"}'),
        H(
            "body-sent-as-text",
            400,
            None,
            ("Content-Type: application/json",),
            json.dumps(_body()).encode(),
            headers=(("Content-Type", "text/plain"),),
        ),
        H("body-a-list", 400, None, ("must be a JSON object",), [1, 2]),
        H("body-nested-100k-deep", 400, None, ("not valid JSON", "nested too deeply"), _deep().encode()),
        H(
            "no-model-field",
            400,
            "model",
            ("Field required",),
            {"messages": [{"role": "user", "content": "hi"}]},
        ),
        H("unknown-model", 404, "model", ("does not exist here",), _body(model="gpt-4o")),
        H("no-messages", 400, "messages", ("at least 1",), _body() | {"messages": []}),
        H(
            "role-tool",
            400,
            "messages[0].role",
            ("'assistant'",),
            {"model": SERVED, "messages": [{"role": "tool", "content": "x"}]},
        ),
        H("content-a-number", 400, "messages[0].content", ("messages[0].content",), _body(7)),
        H(
            "assistant-first",
            400,
            "messages",
            ("expected 'user'",),
            {"model": SERVED, "messages": [{"role": "assistant", "content": "x"}]},
        ),
        H("unknown-field-tools", 400, "tools", ("not supported",), _body(tools=[])),
        H("n-two", 400, "n", ("n=2 is not supported",), _body(n=2)),
        H("temperature-five", 400, "temperature", ("less than or equal to 2",), _body(temperature=5)),
        H("top-p-zero", 400, "top_p", ("greater than 0",), _body(top_p=0)),
        H("max-tokens-zero", 400, "max_tokens", ("greater than or equal to 1",), _body(max_tokens=0)),
        H("max-tokens-over-the-cap", 400, "max_tokens", ("--max-tokens",), _body(max_tokens=100_000)),
        H(
            "max-tokens-disagree",
            400,
            "max_tokens",
            ("disagree",),
            _body(max_tokens=2, max_completion_tokens=3),
        ),
        H("max-tokens-a-bool", 400, "max_tokens", ("valid integer",), _body(max_tokens=True)),
        H("stream-a-string", 400, "stream", ("valid boolean",), _body(stream="yes")),
        H("seed-not-an-int", 400, "seed", ("integer",), _body(seed="abc")),
        H("stop-five-strings", 400, "stop", ("1 to 4",), _body(stop=["a", "b", "c", "d", "e"])),
        H("stop-empty-string", 400, "stop", ("non-empty",), _body(stop=[""])),
        H("presence-penalty", 400, "presence_penalty", ("not supported",), _body(presence_penalty=1)),
        H("logprobs", 400, "logprobs", ("not supported",), _body(logprobs=True)),
        H(
            "response-format-json",
            400,
            "response_format.type",
            ("'text'",),
            _body(response_format={"type": "json_object"}),
        ),
        H(
            "stream-options-unknown",
            400,
            "stream_options.usage",
            ("not supported",),
            _body(stream=True, stream_options={"usage": 1}),
        ),
        H(
            "part-type-audio",
            400,
            "messages[0].content[0]",
            ("input_audio",),
            _body([{"type": "input_audio", "input_audio": {}}]),
        ),
        H(
            "image-url-missing",
            400,
            IMG,
            ("Field required",),
            _body([{"type": "image_url", "image_url": {}}]),
        ),
        H("image-base64-malformed", 400, IMG, ("base64",), _body([_image("data:image/png;base64,@@@@")])),
        H(
            "data-uri-not-an-image-type",
            400,
            IMG,
            ("data:image/",),
            _body([_image(_data_uri(png, "text/plain"))]),
        ),
        H(
            "image-bytes-not-an-image",
            400,
            IMG,
            ("not a PNG, JPEG",),
            _body([_image(_data_uri(b"hello, world"))]),
        ),
        H(
            "image-truncated",
            400,
            IMG,
            ("truncated or corrupt",),
            _body([_image(_data_uri(cut[: len(cut) // 2]))]),
        ),
        H(
            "image-gigapixel",
            400,
            IMG,
            ("100000x100000", "--max-image-pixels"),
            _body([_image(_data_uri(gigapixel_png()))]),
        ),
        H("image-over-max-bytes", 400, IMG, ("--max-image-mb",), _body([_image(_data_uri(bytes(60_000)))])),
        H("image-file-url", 400, IMG, ("'file'", "data:"), _body([_image("file:///etc/passwd")])),
        H(
            "image-remote-url",
            400,
            IMG,
            ("--allow-remote-images",),
            _body([_image("http://example.com/cat.png")]),
        ),
        H(
            "image-in-system-message",
            400,
            "messages[0].content[0].image_url.url",
            ("user messages only",),
            {"model": SERVED, "messages": [{"role": "system", "content": [_image(_data_uri(png))]}]},
        ),
        H(
            "too-many-images",
            400,
            "messages[0].content[8].image_url.url",
            ("--max-images",),
            _body([_image(_data_uri(png))] * 9),
        ),
        H("prompt-over-the-context", 400, "messages", ("context",), _body("word " * 600)),
        H(
            "text-lone-surrogate",
            400,
            "messages",
            ("turn 0 (user)", "not valid Unicode"),
            json.dumps(_body("caf")).replace('"caf"', '"caf\\ud800"').encode(),
        ),
        H(
            "stream-with-a-bad-image",
            400,
            IMG,
            ("not a PNG, JPEG",),
            _body([_image(_data_uri(b"GIF89"))], stream=True),
        ),
        H("body-over-the-cap", 413, None, ("--max-body-mb",), _body("x" * 250_000)),
        H("no-api-key", 401, None, ("Authorization: Bearer",), _body(), key=None),
        H("wrong-api-key", 401, None, ("incorrect API key",), _body(), key="sk-wrong"),
        H("unknown-route", 404, None, ("no route",), _body(), path="/v1/nothing"),
        H("get-on-a-post-route", 405, None, ("Method Not Allowed",), None, method="GET"),
        H(
            "unknown-model-card",
            404,
            "model",
            ("does not exist here",),
            None,
            method="GET",
            path="/v1/models/gpt-4o",
        ),
        _serve_cli("model-missing", ("no-model",), lambda t, w: [str(t / "no-model"), "--port", "0"]),
        _serve_cli(
            "max-batch-zero",
            ("max_batch must be at least 1",),
            lambda t, w: [str(w.model), "--max-batch", "0"],
        ),
        _serve_cli(
            "max-body-mb-zero",
            ("max_body_bytes must be at least 1",),
            lambda t, w: [str(w.model), "--max-body-mb", "0"],
        ),
        _serve_cli("port-out-of-range", ("--port",), lambda t, w: [str(w.model), "--port", "70000"]),
        _serve_cli("port-not-a-number", ("--port", "'http'"), lambda t, w: [str(w.model), "--port", "http"]),
    ]


CASES = serve_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
