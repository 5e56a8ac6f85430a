"""No request can stall the server, fill its memory or leak what it should not: a corpus of abusive
requests against a real uvicorn on 127.0.0.1, each answered at once with a clear error in OpenAI's shape
(or the documented behaviour), and the behaviours behind them: rendering outside any shared lock, a
budget for decoded images, a body deadline, truncated PNGs refused, no paths in the model id, no query
strings in the access log, a port in use said before the model loads."""

from __future__ import annotations

import http.client
import io
import json
import logging
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import broken_images
import pytest
from PIL import Image
from serving import data_uri, png_bytes, running, user

from vistune import cli
from vistune.infer.engine import MB, ServeConfig
from vistune.infer.generate import Generator, load_generator
from vistune.infer.server import _parser, config_from_args, create_app, served_name
from vistune.model.vlm import save_vlm

NAME = "tiny"
LIMITS = dict(
    max_body_bytes=40 * MB, body_timeout_s=1.0, max_messages=64, max_image_memory_bytes=64 * MB,
    max_image_pixels=25_000_000, max_images=8, refusal_delay_s=0.3,
)  # fmt: skip


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("abuse") / "run" / "model"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return out


@pytest.fixture(scope="module")
def gen(model_dir):
    return load_generator(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def served(gen):
    """(base URL, engine) of the tiny model served with small limits and a 1 s body deadline."""
    app = create_app(gen, ServeConfig(model_name=NAME, **LIMITS))
    with running(app) as url:
        yield url, app.state.engine


def _send(url: str, body: bytes | dict, path: str = "/v1/chat/completions", method: str = "POST"):
    """(status, headers, JSON body, seconds) of one request on a fresh connection."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    started = time.monotonic()
    conn.request(method, path, data if method == "POST" else None, {"Content-Type": "application/json"})
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, dict(response.getheaders()), json.loads(text), time.monotonic() - started


def _chat(messages: list, **fields) -> dict:
    return {"model": NAME, "messages": messages, "max_tokens": 2, "temperature": 0} | fields


def _header_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (its pixel data is a stub: never decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def _image(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(data)}}


def _short_png() -> bytes:
    """Valid chunks and a complete zlib stream, a quarter of the rows missing (Pillow pads them black)."""
    raw = broken_images.raw_rows()
    return broken_images.png_bytes(raw[: len(raw) * 3 // 4])


# --- the corpus: each request answered at once (within `seconds`) with this status, code and words ----------


@dataclass(frozen=True)
class Abuse:
    name: str
    body: Callable[[], bytes | dict]
    status: int
    code: str
    words: tuple[str, ...]
    seconds: float = 10.0


def _alternating(n: int) -> list[dict]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(n)]


CORPUS = [
    Abuse("2001-messages", lambda: _chat(_alternating(2001)), 400, "too_many_messages", ("2001", "64")),
    Abuse("4001-messages", lambda: _chat(_alternating(4001)), 400, "too_many_messages", ("--max-messages",)),
    Abuse("messages-with-escaped-role-keys",  # not counted in the raw bytes: counted once parsed
          lambda: json.dumps(_chat(_alternating(101))).replace('"role"', '"\\u0072ole"').encode(),
          400, "too_many_messages", ("101 messages",)),
    Abuse("30-mb-text", lambda: _chat([{"role": "user", "content": "x" * 30_000_000}]), 400,  # unparsed
          "context_length_exceeded", ("bytes besides its images", "--max-prompt-chars")),
    Abuse("text-just-over-the-cap", lambda: _chat([{"role": "user", "content": "z" * 9000}]), 400,
          "context_length_exceeded", ("9000 characters", "over this server's limit of 8192")),
    Abuse("text-spread-over-parts", lambda: _chat([{"role": "user", "content": [
        {"type": "text", "text": "y" * 5000}] * 4}]), 400, "context_length_exceeded", ("20000 characters",)),
    Abuse("8-images-5000x5000", lambda: _chat([user("what?", *[_image(_header_png(5000, 5000))] * 8)]), 413,
          "image_too_large", ("72 MiB decoded", "--max-image-memory-mb")),
    Abuse("truncated-png", lambda: _chat([user("what?", _image(_short_png()))]), 400, "invalid_image",
          ("truncated or corrupt", "ends", "bytes early")),
    Abuse("png-cut-in-half", lambda: _chat([user("what?", _image(png_bytes(size=(64, 64))[:60]))]), 400,
          "invalid_image", ("truncated or corrupt",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CORPUS, ids=[c.name for c in CORPUS])
def test_an_abusive_request_is_answered_at_once(served, case):
    url, engine = served
    status, _, body, seconds = _send(url, case.body())
    error = body["error"]
    assert status == case.status and error["code"] == case.code, body
    assert all(w in error["message"] for w in case.words), error["message"]
    assert "\n" not in error["message"] and seconds < case.seconds
    assert engine.memory.used == 0  # nothing left held


def test_a_refusal_for_a_size_limit_is_answered_after_a_pause(served):
    """A client that repeats an oversized request at once sends one per pause; other errors are at once."""
    url, _ = served
    status, _, body, seconds = _send(url, _chat(_alternating(200)))
    assert status == 400 and body["error"]["code"] == "too_many_messages" and seconds >= 0.3
    status, _, body, seconds = _send(url, _chat(_alternating(1), n=2))
    assert status == 400 and body["error"]["param"] == "n" and seconds < 0.3


def _raw_socket(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _head(length: int) -> bytes:
    lines = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json",
             f"Content-Length: {length}", "", ""]  # fmt: skip
    return "\r\n".join(lines).encode()


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):  # ends when the server closes the connection
        data += chunk
    return data


@pytest.mark.parametrize("trickle", [False, True], ids=["declares-100-sends-10", "one-byte-at-a-time"])
def test_a_body_that_does_not_arrive_in_time_is_cut_off(served, trickle):
    url, _ = served
    sock = _raw_socket(url)
    started = time.monotonic()
    sock.sendall(_head(100) + b'{"model": ')
    if trickle:  # bytes keep coming, too slowly: the deadline is for the whole body
        for _ in range(6):
            time.sleep(0.3)
            try:
                sock.sendall(b" ")
            except OSError:
                break
    answer = _read_all(sock)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"--body-timeout" in answer, answer[:300]
    assert time.monotonic() - started < 5  # answered and closed, not held open


def test_rendering_holds_no_lock_the_others_need(served, monkeypatch):
    """A request stuck in rendering (a huge conversation) does not delay a normal request."""
    url, _ = served
    release, stuck = threading.Event(), threading.Event()
    real = Generator.prompt_ids

    def slow(self, turns, num_images, tokenizer=None):
        if turns[0].content == "slow":
            stuck.set()
            release.wait(30)
        return real(self, turns, num_images, tokenizer)

    monkeypatch.setattr(Generator, "prompt_ids", slow)
    with ThreadPoolExecutor(1) as pool:
        slow_reply = pool.submit(_send, url, _chat([{"role": "user", "content": "slow"}]))
        assert stuck.wait(10)
        status, _, body, seconds = _send(url, _chat([{"role": "user", "content": "hello"}]))
        assert status == 200 and seconds < 10 and not slow_reply.done()
        release.set()
        assert slow_reply.result()[0] == 200


def _flat_png(side: int, red: int = 200) -> dict:
    """An image part: a flat square PNG (new bytes for each `red`: the feature cache cannot serve it)."""
    out = io.BytesIO()
    Image.new("RGB", (side, side), (red, 40, 40)).save(out, "PNG", compress_level=1)
    return _image(out.getvalue())


def test_the_image_memory_budget_bounds_what_requests_hold(served, monkeypatch):
    """Concurrent requests with large images: each image reserves its decoded size before decoding,
    keeps only its downscaled copy, never more than the budget in all; a busy budget answers 429."""
    url, engine = served
    peak, take = [0], engine.memory._take

    def watched(n):
        ok = take(n)
        peak[0] = max(peak[0], engine.memory.used)
        return ok

    monkeypatch.setattr(engine.memory, "_take", watched)

    def three(k: int) -> dict:  # 18 MiB each decoded; the tiny tower needs 32 px
        return _chat([user("what?", *(_flat_png(2500, 10 * k + j) for j in range(3)))])

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda k: _send(url, three(k)), range(4)))
    assert {r[0] for r in replies} <= {200, 429} and 200 in {r[0] for r in replies}
    assert all(r[1].get("retry-after") == "1" for r in replies if r[0] == 429)
    assert 0 < peak[0] <= engine.config.max_image_memory_bytes and engine.memory.used == 0
    busy = engine.memory.lease()
    busy.reserve(60 * MB, "test", "a test")  # the budget is 64 MiB: 18 MiB no longer fits
    status, headers, body, _ = _send(url, _chat([user("what?", _flat_png(2500, 251))]))
    busy.release()
    assert status == 429 and body["error"]["code"] == "image_memory_busy" and headers["retry-after"] == "1"
    assert _send(url, _chat([user("what?", _flat_png(2500, 252))]))[0] == 200 and engine.memory.used == 0


def test_large_images_are_decoded_in_full_by_one_request_at_a_time(served):
    """A PNG over 4 MP is decoded in full: while another request does that, 429 at once; a JPEG, decoded
    at a reduced scale, needs no slot."""
    url, engine = served
    engine.large_decodes.take("test")  # another request is decoding a large image
    try:
        status, headers, body, _ = _send(url, _chat([user("what?", _flat_png(2500, 253))]))
        assert status == 429 and body["error"]["code"] == "decoder_busy" and headers["retry-after"] == "1"
        jpeg = io.BytesIO()
        Image.new("RGB", (2500, 2500), (20, 200, 20)).save(jpeg, "JPEG")
        assert _send(url, _chat([user("what?", _image(jpeg.getvalue()))]))[0] == 200
    finally:
        engine.large_decodes.give()
    assert _send(url, _chat([user("what?", _flat_png(2500, 253))]))[0] == 200 and engine.memory.used == 0


def test_images_are_decoded_downscaled_to_what_the_tower_needs(served):
    _, engine = served
    from vistune.infer.api import ChatRequest

    lease_sizes = []
    prepared = engine.prepare(ChatRequest(model=NAME, messages=[user("what?", _flat_png(2000, 3))]))
    lease_sizes.append(prepared.lease.held)
    image = prepared.images[0].image
    prepared.lease.release()
    assert 32 <= min(image.size) < 64 and lease_sizes == [image.width * image.height * 3]


def test_the_model_id_is_a_name_and_health_shows_no_paths(model_dir, gen, tmp_path):
    assert served_name(str(model_dir)) == "run"  # a run's OUT/model: the run's name
    assert served_name(str(model_dir.parent)) == "run" and served_name("org/some-llm") == "org/some-llm"
    config = config_from_args(_parser().parse_args([str(model_dir)]))
    assert config.model_name == "run"
    with running(create_app(gen, config)) as url:
        status, _, health, _ = _send(url, b"", path="/health", method="GET")
        text = json.dumps(health)
        assert status == 200 and health["model"] == "run" and str(model_dir) not in text and "/" not in text
    named = config_from_args(_parser().parse_args([str(model_dir), "--model-name", "mine"]))
    assert named.model_name == "mine"


def test_keys_in_the_query_string_stay_out_of_the_access_log(served, caplog):
    url, _ = served
    with caplog.at_level(logging.INFO, logger="uvicorn.access"):
        _send(url, b"", path="/v1/models?api_key=sk-secret-in-url&token=t0k3n", method="GET")
        time.sleep(0.2)
    logged = caplog.text
    assert "/v1/models" in logged and "sk-secret-in-url" not in logged and "t0k3n" not in logged


def test_a_port_in_use_is_said_before_the_model_loads(model_dir, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("vistune.infer.generate.load_generator", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        try:
            code = cli.main(["serve", str(model_dir), "--port", str(port)])
        finally:
            root.handlers[:], root.level = handlers, level
    err = capsys.readouterr().err
    assert code == 2 and f"--port {port}: 127.0.0.1:{port} is already in use" in err, err
