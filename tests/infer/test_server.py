"""`vistune serve` end to end: a tiny VLM on a loopback port, driven by the real `openai` client (and raw HTTP
where the client hides what is checked): images as data URIs, streaming, multi-turn, keys, limits, errors."""

from __future__ import annotations

import http.client
import json
import logging
import socket

import openai
import pytest
from PIL import Image
from serving import BLUE, GREEN, RED, data_uri, image_part, png_bytes, running, user

from vistune.data.records import Turn
from vistune.infer.engine import ServeConfig
from vistune.infer.generate import load_generator
from vistune.infer.guards import exposure_warning
from vistune.infer.server import create_app
from vistune.model.vlm import save_vlm

KEY = "sk-test-key"
NAME = "tiny-vlm"


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "model"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return out


@pytest.fixture(scope="module")
def gen(model_dir):
    return load_generator(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def base_url(gen):
    config = ServeConfig(model_name=NAME, api_key=KEY, max_body_bytes=200_000, max_image_pixels=1_000_000)
    with running(create_app(gen, config)) as url:
        yield url


@pytest.fixture
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _image(colour, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _raw(base_url: str, body: dict | bytes, key: str | None = KEY, path="/v1/chat/completions"):
    """POST with http.client: (status, headers, body text)."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body), headers)
    response = conn.getresponse()
    result = response.status, dict(response.getheaders()), response.read().decode()
    conn.close()
    return result


def _error(text: str) -> dict:
    """The body's OpenAI-shaped error (and that it is one)."""
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in text
    return error


def test_chat_with_a_data_uri_image_equals_the_generator(client, gen):
    out = client.chat.completions.create(
        model=NAME, messages=[user("What colour is it?", image_part(RED))], max_tokens=6, temperature=0
    )
    expected = gen.generate(
        [[Turn("user", "<image>\nWhat colour is it?")]], [[_image(RED)]], max_new_tokens=6
    )
    assert out.choices[0].message.content == expected[0] and expected[0]
    assert out.choices[0].finish_reason in ("stop", "length") and out.object == "chat.completion"
    prompt = gen.prompt_ids([Turn("user", "<image>\nWhat colour is it?")], 1)
    assert out.usage.prompt_tokens == len(prompt) and 1 <= out.usage.completion_tokens <= 6
    other = client.chat.completions.create(
        model=NAME, messages=[user("What colour is it?", image_part(BLUE))], max_tokens=6, temperature=0
    )
    assert other.choices[0].message.content != out.choices[0].message.content  # the image is seen


def test_streaming_chunks_add_up_to_the_answer_and_end_with_done(client, base_url):
    messages = [user("Describe it.", image_part(GREEN))]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    status, headers, text = _raw(
        base_url, {"model": NAME, "messages": messages, "max_tokens": 3, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_text_only_and_two_images_over_two_turns(client, gen):
    text = client.chat.completions.create(
        model=NAME, max_tokens=5, temperature=0,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
    )  # fmt: skip
    turns = [Turn("system", "Be brief."), Turn("user", "Hello there")]
    assert text.choices[0].message.content == gen.generate([turns], max_new_tokens=5)[0]
    messages = [
        user("What is this?", image_part(RED)),
        {"role": "assistant", "content": "A red picture."},
        user("And this one?", image_part(BLUE, (16, 30))),
    ]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    turns = [
        Turn("user", "<image>\nWhat is this?"),
        Turn("assistant", "A red picture."),
        Turn("user", "<image>\nAnd this one?"),
    ]
    expected = gen.generate([turns], [[_image(RED), _image(BLUE, (16, 30))]], max_new_tokens=6)[0]
    assert out.choices[0].message.content == expected
    swapped = gen.generate([turns], [[_image(BLUE, (16, 30)), _image(RED)]], max_new_tokens=6)[0]
    assert swapped != expected  # each image went to its own turn


def test_a_typed_placeholder_stays_text(client, gen):
    messages = [
        {"role": "user", "content": "What does <image> mean in your prompts?"},
        {"role": "assistant", "content": "A picture goes there."},
        user("Then look: what is <image> here?", image_part(RED)),
    ]
    out = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    turns = [
        Turn("user", "What does <image> mean in your prompts?", 0),
        Turn("assistant", "A picture goes there.", 0),
        Turn("user", "<image>\nThen look: what is <image> here?", 1),
    ]
    assert out.choices[0].message.content == gen.generate([turns], [[_image(RED)]], max_new_tokens=6)[0]
    image_token = gen.vlm.image_token_id
    assert gen.prompt_ids(turns, 1).count(image_token) == gen.vlm.image_tokens  # one image's worth


def test_keys(base_url, client):
    wrong = openai.OpenAI(base_url=f"{base_url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    status, headers, text = _raw(base_url, {"model": NAME, "messages": []}, key=None)
    assert (
        status == 401
        and headers["www-authenticate"] == "Bearer"
        and "Authorization: Bearer" in _error(text)["message"]
    )
    assert [m.id for m in client.models.list()] == [NAME]
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port))
    conn.request("GET", "/health")  # no key needed, and says nothing secret
    health = json.loads(conn.getresponse().read())
    assert health["status"] == "ok" and health["images"] is True and KEY not in json.dumps(health)


def test_body_over_the_cap_is_413(client, base_url):
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(
            model=NAME, messages=[user("x" * 250_000, image_part(RED))], max_tokens=2
        )
    assert err.value.status_code == 413 and err.value.body["code"] == "request_too_large"
    assert "--max-body-mb" in err.value.body["message"]
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:  # chunked: no Content-Length
        head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        sock.sendall(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
        for _ in range(5):  # 250 kB, past the 200 kB cap; the body never ends
            sock.sendall(b"c350\r\n" + b"y" * 50_000 + b"\r\n")
        answer = sock.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.1 413") and '"code":"request_too_large"' in answer


def _gigapixel_png() -> bytes:
    """A valid little PNG whose header says 100000 x 100000 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_png_declaring_gigapixels_is_refused_without_decoding(client, monkeypatch):
    from PIL import ImageFile

    loads = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self.size) or original(self))
    part = {"type": "image_url", "image_url": {"url": data_uri(_gigapixel_png())}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[user("what?", part)], max_tokens=2)
    body = err.value.body
    assert "100000x100000" in body["message"] and "--max-image-pixels" in body["message"]
    assert body["param"] == "messages[0].content[0].image_url.url" and body["code"] == "image_too_large"
    assert loads == []  # refused from the header: no pixel data was decoded


def test_remote_and_file_urls_are_refused_by_default(client):
    for url, flag in (
        ("http://example.com/cat.png", "--allow-remote-images"),
        ("file:///etc/passwd", "data:"),
    ):
        part = {"type": "image_url", "image_url": {"url": url}}
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=NAME, messages=[user("what?", part)], max_tokens=2)
        assert flag in err.value.body["message"] and err.value.body["param"].endswith("image_url.url")


def test_with_remote_urls_allowed_local_addresses_are_never_fetched(gen):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from threading import Thread

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append(self.path)
            body = png_bytes(RED)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    local = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    Thread(target=local.serve_forever, daemon=True).start()
    port = local.server_address[1]
    config = ServeConfig(model_name=NAME, allow_remote_images=True, fetch_timeout_s=5)
    try:
        with running(create_app(gen, config)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            targets = [f"http://127.0.0.1:{port}/red.png", f"http://localhost:{port}/red.png",
                       f"http://[::ffff:127.0.0.1]:{port}/red.png", "file:///etc/passwd"]  # fmt: skip
            for target in targets:
                part = {"type": "image_url", "image_url": {"url": target}}
                with pytest.raises(openai.BadRequestError) as err:
                    client.chat.completions.create(model=NAME, messages=[user("what?", part)], max_tokens=2)
                assert "refused" in err.value.body["message"], target
    finally:
        local.shutdown()
    assert seen == []  # the local server saw no request at all


def _chat(content, **fields) -> dict:
    """A request body with one user message."""
    return {"model": NAME, "messages": [{"role": "user", "content": content}]} | fields


BAD_IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}
PART = "messages[0].content[0]"


@pytest.mark.parametrize(
    "body, param, words",
    [
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "Field required"),
        ({"model": NAME, "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "'assistant'"),
        (_chat("x", n=2), "n", "n=2 is not supported"),
        (_chat("x", tools=[]), "tools", "not supported"),
        (_chat("x", temperature=5), "temperature", "less"),
        (_chat("x", max_tokens=10_000), "max_tokens", "--max-tokens"),
        (_chat("x", max_completion_tokens=10_000), "max_completion_tokens", "--max-tokens"),
        (_chat([BAD_IMAGE]), f"{PART}.image_url.url", "base64"),
        (_chat([{"type": "image_url", "image_url": {}}]), f"{PART}.image_url.url", "Field required"),
        (_chat([{"type": "input_audio", "input_audio": {}}]), PART, "input_audio"),
        ({"model": NAME, "messages": [{"role": "assistant", "content": "x"}]}, "messages", "expected 'user'"),
        (_chat([image_part(RED)] * 9), "messages[0].content[8].image_url.url", "--max-images"),
        (_chat("x") | {"model": "gpt-4o"}, "model", "does not exist"),
        (_chat("word " * 600), "messages", "context"),
        (
            _chat("word " * 300, max_tokens=400),
            "max_tokens",
            "need more than the model's context (512 tokens)",
        ),
    ],
)
def test_malformed_requests_get_openai_shaped_errors(base_url, body, param, words):
    status, _, text = _raw(base_url, body)
    error = _error(text)
    assert status == (404 if "does not exist" in words else 400), text
    assert error["param"] == param and words in error["message"], error


def test_bad_json_and_unknown_routes(base_url):
    status, _, text = _raw(base_url, b'{"model": ')
    assert status == 400 and "not valid JSON" in _error(text)["message"]
    status, _, text = _raw(base_url, {}, path="/v1/nothing")
    assert status == 404 and _error(text)["type"] == "not_found_error"


def test_logs_hold_neither_images_nor_keys(client, caplog):
    part = image_part(GREEN, (20, 20))
    payload = part["image_url"]["url"].split(",", 1)[1]
    with caplog.at_level(logging.DEBUG):
        client.chat.completions.create(model=NAME, messages=[user("secret words", part)], max_tokens=2)
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model=NAME, messages=[user("x", part)], max_tokens=2, n=3)
    assert "image(s)" in caplog.text  # the request was logged ...
    assert payload[:40] not in caplog.text and KEY not in caplog.text and "secret words" not in caplog.text


def test_a_plain_llm_serves_text_and_refuses_images(model_dir):
    plain = load_generator(str(model_dir / "llm"), device="cpu")
    with running(create_app(plain, ServeConfig(model_name="plain"))) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        out = client.chat.completions.create(
            model="plain", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0
        )
        assert out.choices[0].message.content == plain.generate([[Turn("user", "hi")]], max_new_tokens=3)[0]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="plain", messages=[user("what?", image_part(RED))], max_tokens=2
            )
        assert "text-only" in err.value.body["message"] and err.value.body["code"] == "images_not_supported"


def test_binding_beyond_loopback_without_a_key_warns():
    assert exposure_warning("127.0.0.1", None) is None and exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    assert "without an API key" in exposure_warning("0.0.0.0", None)
    assert "VISTUNE_API_KEY" in exposure_warning("192.168.1.5", None)


def test_flags_become_the_config(monkeypatch):
    from vistune.infer.server import _parser, config_from_args

    monkeypatch.setenv("VISTUNE_API_KEY", "from-env")
    args = _parser().parse_args(["m", "--max-body-mb", "1", "--max-wait-ms", "25", "--allow-remote-images"])
    config = config_from_args(args)
    assert config.api_key == "from-env" and config.model_name == "m" and config.allow_remote_images
    assert config.max_body_bytes == 2**20 and config.max_wait_s == 0.025 and config.max_images == 8
    assert config.prefix_cache_bytes == 256 * 2**20
    assert config_from_args(_parser().parse_args(["m", "--prefix-cache-mb", "0"])).prefix_cache_bytes == 0
    with pytest.raises(ValueError, match="prefix_cache_bytes must be >= 0"):
        config_from_args(_parser().parse_args(["m", "--prefix-cache-mb", "-1"]))
    args = _parser().parse_args(["m", "--api-key", "k", "--served-model-name", "shown", "--max-batch", "0"])
    with pytest.raises(ValueError, match="max_batch must be at least 1"):
        config_from_args(args)
