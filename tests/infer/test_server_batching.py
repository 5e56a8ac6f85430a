"""The server's scheduler through HTTP: requests that arrive together share one generate call, the feature
cache serves follow-up turns, a full queue answers 429, a client that goes away frees its row, and per-row
sampling, stop strings and token limits hold inside a batch."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from serving import BLUE, GREEN, RED, image_part, running, user
from transformers import StoppingCriteria, StoppingCriteriaList

from vistune.infer.engine import ServeConfig
from vistune.infer.generate import load_generator
from vistune.infer.scheduler import fits
from vistune.model.vlm import save_vlm

NAME = "tiny"


@pytest.fixture(scope="module")
def gen(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("batching") / "model"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return load_generator(str(out), device="cpu")


def _server(gen, **limits):
    from vistune.infer.server import create_app

    app = create_app(gen, ServeConfig(model_name=NAME, **limits))
    return app, running(app)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _ask(client, messages, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, **({"temperature": 0} | kw))


@pytest.fixture
def calls(gen, monkeypatch):
    """Record the batch size of every generate call, and the images of every encode call."""
    log = {"batches": [], "encoded": []}
    generate_ids, encode_images = gen.generate_ids, gen.encode_images

    def counting_generate(prompts, *args, **kwargs):
        log["batches"].append(len(prompts))
        return generate_ids(prompts, *args, **kwargs)

    def counting_encode(images):
        log["encoded"].append(len(images))
        return encode_images(images)

    monkeypatch.setattr(gen, "generate_ids", counting_generate)
    monkeypatch.setattr(gen, "encode_images", counting_encode)
    return log


class _Slow(StoppingCriteria):
    """Makes every decoding step take a while, so a test can act in the middle of a generation."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, input_ids, scores, **kwargs):
        time.sleep(self.seconds)
        import torch

        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _slow_down(gen, monkeypatch, seconds: float) -> None:
    generate_ids = gen.generate_ids

    def slow(prompts, *args, stopping_criteria=None, **kwargs):
        criteria = StoppingCriteriaList([*(stopping_criteria or []), _Slow(seconds)])
        return generate_ids(prompts, *args, stopping_criteria=criteria, **kwargs)

    monkeypatch.setattr(gen, "generate_ids", slow)


def test_requests_that_arrive_together_share_one_generate_call(gen, calls):
    requests = [
        [user("What is it?", image_part(RED))],
        [user("Describe this picture in detail.", image_part(BLUE, (30, 20)))],
        [{"role": "user", "content": "Hello, how are you today?"}],
        [user("Two?", image_part(GREEN), image_part(RED, (12, 12)))],
    ]
    seeded = {"temperature": 1.0, "top_p": 0.9, "seed": 1234}
    app, server = _server(gen, max_batch=8, max_wait_s=0.5)
    with server as url:
        client = _client(url)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda m: _ask(client, m, max_tokens=6, **seeded), requests))
        assert calls["batches"] == [4]
        app.state.engine.scheduler.max_wait_s = 0  # from here on each request runs alone, at once
        alone = [_ask(client, m, max_tokens=6, **seeded) for m in requests]
        greedy = [_ask(client, m, max_tokens=6) for m in requests]
    assert calls["batches"] == [4, 1, 1, 1, 1, 1, 1, 1, 1]
    texts = [r.choices[0].message.content for r in together]
    assert texts == [r.choices[0].message.content for r in alone]  # seeded rows: the same in any batch
    assert texts != [r.choices[0].message.content for r in greedy]  # ... and they were sampled
    assert app.state.engine.scheduler.stats["largest_batch"] == 4


def test_padding_may_be_at_most_half_a_batch():
    assert fits([50, 60], 55) and fits([56] * 15, 60)
    assert not fits([56] * 15, 260)  # eight images' worth of prompt: the next batch
    assert fits([260], 56) and not fits([260, 56], 56)  # it may lead a batch with a short row or so


def test_a_long_prompt_waits_for_a_batch_of_its_own(gen, calls):
    """Eight images' worth of prompt does not join three short requests (it would pad them all)."""
    short = [[user(f"What is {k}?", image_part(RED))] for k in range(3)]
    images = [image_part(c, (20 + k, 16)) for k in range(4) for c in (RED, BLUE)]
    long = [user("Compare them all, one by one. " * 10, *images)]
    app, server = _server(gen, max_batch=8, max_wait_s=0.5)
    with server as url, ThreadPoolExecutor(4) as pool:
        client = _client(url)
        replies = [pool.submit(_ask, client, m, max_tokens=2) for m in short]
        time.sleep(0.1)  # the short ones first: the first of them leads the batch
        replies.append(pool.submit(_ask, client, long, max_tokens=2))
        assert all(r.result().choices[0].message.content is not None for r in replies)
    assert calls["batches"] == [3, 1] and app.state.engine.scheduler.queued == 0


def test_a_follow_up_turn_reuses_the_image_features(gen, calls):
    app, server = _server(gen, prefix_cache_bytes=0)  # features alone (the prefix would hold the image)
    with server as url:
        client = _client(url)
        first = [user("What colour?", image_part(BLUE))]
        answer = _ask(client, first, max_tokens=5).choices[0].message.content
        assert calls["encoded"] == [1]
        follow = [*first, {"role": "assistant", "content": answer}, user("Are you sure?")]
        cached = _ask(client, follow, max_tokens=5).choices[0].message.content
        assert calls["encoded"] == [1] and app.state.engine.cache.hits == 1  # not encoded again
        app.state.engine.cache._items.clear()
        assert _ask(client, follow, max_tokens=5).choices[0].message.content == cached
        assert calls["encoded"] == [1, 1]  # with the cache emptied it is encoded again, same answer


def test_a_full_queue_answers_429_with_retry_after(gen, monkeypatch):
    gate = threading.Event()
    generate_ids = gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: gate.wait(30) and generate_ids(*a, **k))
    app, server = _server(gen, max_batch=1, max_queue=1, max_wait_s=0)
    scheduler = app.state.engine.scheduler
    with server as url, ThreadPoolExecutor(2) as pool:
        client = _client(url)
        running = pool.submit(_ask, client, [{"role": "user", "content": "first"}], max_tokens=2)
        _until(lambda: scheduler.running == 1)
        waiting = pool.submit(_ask, client, [{"role": "user", "content": "second"}], max_tokens=2)
        _until(lambda: scheduler.queued == 1)
        with pytest.raises(openai.RateLimitError) as err:
            _ask(client, [{"role": "user", "content": "third"}], max_tokens=2)
        assert int(err.value.response.headers["retry-after"]) >= 1
        assert err.value.body["code"] == "queue_full" and err.value.body["type"] == "rate_limit_error"
        gate.set()
        assert running.result().choices[0].message.content and waiting.result().choices[0].message.content


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _post(url: str, body: dict) -> socket.socket:
    """Send a chat request on a raw socket (so the test can hang up whenever it likes)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    head = ["POST /v1/chat/completions HTTP/1.1", "Host: x", "Content-Type: application/json"]
    sock.sendall("\r\n".join([*head, f"Content-Length: {len(data)}", "", ""]).encode() + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_frees_its_row(gen, monkeypatch, stream):
    _slow_down(gen, monkeypatch, 0.02)  # 300 tokens would take 6 s
    app, server = _server(gen)
    stats = app.state.engine.scheduler.stats
    with server as url:
        body = {
            "model": NAME,
            "messages": [{"role": "user", "content": "go on"}],
            "max_tokens": 300,
            "stream": stream,
        }
        sock = _post(url, body)
        if stream:
            received = b""
            while b'"content": "' not in received.split(b"\n\n", 1)[-1]:  # a first piece of text
                received += sock.recv(4096)
        else:
            time.sleep(0.3)
        started = time.monotonic()
        sock.close()
        _until(lambda: stats["batches"] == 1)
        assert time.monotonic() - started < 2.0  # the batch ended soon after the hang-up ...
        assert stats["cancelled"] == 1 and stats["tokens"] < 100  # ... with the row cancelled early
        out = _ask(_client(url), [{"role": "user", "content": "still there?"}], max_tokens=2)
        assert out.choices[0].message.content  # and the server serves on


def test_a_queued_request_whose_client_left_is_never_run(gen, calls, monkeypatch):
    gate = threading.Event()
    counting = gen.generate_ids
    monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: gate.wait(30) and counting(*a, **k))
    app, server = _server(gen, max_batch=1, max_wait_s=0)
    scheduler = app.state.engine.scheduler
    with server as url, ThreadPoolExecutor(1) as pool:
        first = pool.submit(_ask, _client(url), [{"role": "user", "content": "first"}], max_tokens=2)
        _until(lambda: scheduler.running == 1)
        sock = _post(url, {"model": NAME, "messages": [{"role": "user", "content": "gone"}], "max_tokens": 2})
        _until(lambda: scheduler.queued == 1)
        sock.close()
        time.sleep(0.5)  # the handler notices the hang-up and marks the job cancelled
        gate.set()
        assert first.result().choices[0].message.content
        _until(lambda: scheduler.stats["cancelled"] == 1)
    assert calls["batches"] == [1]  # only the first request was generated


def test_stop_strings_and_token_limits(gen):
    app, server = _server(gen)
    with server as url:
        client = _client(url)
        messages = [user("Say something long.", image_part(RED))]
        full = _ask(client, messages, max_tokens=10)
        text = full.choices[0].message.content
        assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 10
        stop = text[len(text) // 2 : len(text) // 2 + 3]
        cut = _ask(client, messages, max_tokens=10, stop=[stop, "never-seen"])
        assert cut.choices[0].message.content == text[: text.find(stop)].rstrip()
        assert cut.choices[0].finish_reason == "stop"
        streamed = _ask(client, messages, max_tokens=10, stop=stop, stream=True)
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices]
        assert "".join(pieces) == cut.choices[0].message.content  # no part of the stop string was sent


def test_an_internal_error_is_a_500_without_a_traceback(gen, monkeypatch):
    app, server = _server(gen)
    with server as url:
        client = _client(url)
        generate_ids = gen.generate_ids
        monkeypatch.setattr(gen, "generate_ids", lambda *a, **k: 1 / 0)
        with pytest.raises(openai.InternalServerError) as err:
            _ask(client, [{"role": "user", "content": "hi"}], max_tokens=2)
        assert "ZeroDivision" not in str(err.value.body) and "see the server log" in err.value.body["message"]
        monkeypatch.setattr(gen, "generate_ids", generate_ids)
        assert _ask(client, [{"role": "user", "content": "hi"}], max_tokens=2).choices[0].message.content


def test_the_feature_cache_is_an_lru_bounded_in_bytes():
    import torch

    from vistune.infer.scheduler import FeatureCache

    cache = FeatureCache(max_bytes=3 * 400)  # room for three (10, 10) float32 tensors
    for key in "abc":
        cache.put(key, torch.zeros(10, 10))
    assert cache.get("a") is not None  # a is now the most recently used
    cache.put("d", torch.zeros(10, 10))
    assert cache.get("b") is None and all(cache.get(k) is not None for k in "acd")
    cache.put("huge", torch.zeros(40, 10))  # bigger than the whole cache: not kept, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3 and cache.bytes == 1200
