"""`POST /v1/explain`: off unless enabled; then under the chat endpoint's key and limits, with the answer
given or the model's own, maps of the tower's grid and overlays as PNG data URIs."""

from __future__ import annotations

import base64
import http.client
import io
import json

import pytest
from PIL import Image
from serving import BLUE, RED, image_part, running, user

from vistune.data.records import Turn
from vistune.infer.engine import ServeConfig
from vistune.infer.generate import load_generator
from vistune.infer.server import create_app
from vistune.model.vlm import save_vlm

KEY = "sk-explain"
NAME = "tiny"


@pytest.fixture(scope="module")
def gen(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("explain") / "model"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return load_generator(str(out), device="cpu")


LIMITS = dict(max_body_bytes=60_000, max_messages=4, max_images=1, max_prompt_chars=200, refusal_delay_s=0.0)


@pytest.fixture(scope="module")
def url(gen):
    with running(create_app(gen, ServeConfig(model_name=NAME, api_key=KEY, explain=True, **LIMITS))) as base:
        yield base


def _post(base: str, body: dict | bytes, key: str | None = KEY, path: str = "/v1/explain"):
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    conn.request("POST", path, body if isinstance(body, bytes) else json.dumps(body), headers)
    response = conn.getresponse()
    status, text = response.status, response.read().decode()
    conn.close()
    return status, json.loads(text) if text else None


def _body(*messages: dict, **extra) -> dict:
    return {"model": NAME, "messages": list(messages)} | extra


def test_it_is_off_unless_enabled(gen):
    with running(create_app(gen, ServeConfig(model_name=NAME))) as base:
        status, body = _post(base, _body(user("What colour?", image_part(RED))), key=None)
        assert status == 404 and "no route" in body["error"]["message"]
        assert _get_health(base)["explain"] is False


def _get_health(base: str) -> dict:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.request("GET", "/health")
    return json.loads(conn.getresponse().read())


def test_a_given_answer_is_mapped_over_the_grid(url, gen):
    answer = {"role": "assistant", "content": "red"}
    status, body = _post(
        url, _body(user("What colour is it?", image_part(RED)), answer), path="/v1/explain?method=occlusion"
    )
    assert status == 200, body
    assert body["object"] == "explanation" and body["answer"] == "red" and not body["generated"]
    assert body["method"] == "occlusion" and _get_health(url)["explain"] is True
    [entry] = body["maps"]
    assert entry["grid"] == list(gen.vlm.vision.grid) and len(entry["values"]) == entry["grid"][0]
    png = base64.b64decode(entry["overlay"].removeprefix("data:image/png;base64,"))
    assert Image.open(io.BytesIO(png)).format == "PNG"


def test_without_an_answer_the_model_answers_first_over_two_turns(url, gen):
    messages = [user("What is it?", image_part(BLUE)), {"role": "assistant", "content": "a square"},
                {"role": "user", "content": "And its colour?"}]  # fmt: skip
    status, body = _post(url, _body(*messages, max_tokens=5))
    assert status == 200, body
    image = Image.open(io.BytesIO(base64.b64decode(image_part(BLUE)["image_url"]["url"].split(",")[1])))
    turns = [
        Turn("user", "<image>\nWhat is it?", 1),
        Turn("assistant", "a square"),
        Turn("user", "And its colour?", 0),
    ]
    assert body["generated"] and body["answer"] == gen.generate([turns], [[image]], max_new_tokens=5)[0]


@pytest.mark.parametrize(
    ("body", "key", "status", "code"),
    [
        (_body(user("Hi?", image_part(RED))), None, 401, "invalid_api_key"),
        (_body(user("Hi?", image_part(RED))), "sk-wrong", 401, "invalid_api_key"),
        (_body(user("Two?", image_part(RED), image_part(BLUE))), KEY, 400, "too_many_images"),
        (_body(*[user("a", image_part(RED))] + [user("b")] * 4), KEY, 400, "too_many_messages"),
        (_body(user("x" * 300, image_part(RED))), KEY, 400, "context_length_exceeded"),
        (_body(user("big", image_part(RED, (200, 200)))), KEY, 413, "request_too_large"),
        (_body(user("What?", image_part(RED)), stream=True), KEY, 400, None),
        (_body(user("No image here?")), KEY, 400, None),
        (_body({"role": "assistant", "content": "red"}), KEY, 400, None),
        (_body(user("Hi?", image_part(RED)), max_tokens=5000), KEY, 400, None),
    ],
    ids=[
        "no-key",
        "wrong-key",
        "images",
        "messages",
        "text",
        "body",
        "stream",
        "no-image",
        "no-question",
        "max-tokens",
    ],  # fmt: skip
)
def test_the_chat_endpoints_key_and_limits_hold(url, body, key, status, code):
    if code == "request_too_large":  # noise: a PNG that does not compress below the body cap
        body = _noisy(body)
    got, reply = _post(url, body, key=key)
    assert got == status, reply
    assert reply["error"]["message"] and (code is None or reply["error"]["code"] == code)


def _noisy(body: dict) -> bytes:
    import os

    out = io.BytesIO()
    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(out, "PNG")
    body["messages"][0]["content"][0]["image_url"]["url"] = (
        "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    )
    return json.dumps(body).encode()


def test_an_unknown_method_is_refused(url):
    status, body = _post(url, _body(user("Hi?", image_part(RED))), path="/v1/explain?method=saliency")
    assert status == 400 and "method 'saliency' is not one of" in body["error"]["message"]


def test_one_explanation_at_a_time(gen):
    import threading

    app = create_app(gen, ServeConfig(model_name=NAME, explain=True))
    started, release = threading.Event(), threading.Event()
    real = app.state.explaining.run

    def slow(*args):
        started.set()
        release.wait(30)
        return real(*args)

    app.state.explaining.run = slow
    body = _body(user("What colour?", image_part(RED)), {"role": "assistant", "content": "red"})
    with running(app) as base:
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(reply=_post(base, body, key=None)))
        thread.start()
        assert started.wait(30)
        status, reply = _post(base, body, key=None)
        release.set()
        thread.join(60)
    assert status == 429 and reply["error"]["code"] == "explain_busy"
    assert first["reply"][0] == 200 and first["reply"][1]["answer"] == "red"
