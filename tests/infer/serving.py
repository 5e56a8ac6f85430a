"""Test helpers for `vistune serve`: run an app on a free loopback port in a thread; images as data URIs."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from PIL import Image

RED, GREEN, BLUE = (220, 30, 30), (30, 160, 50), (30, 70, 220)


@contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a port the OS picks, bound before the server starts); yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="info", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def png_bytes(colour=RED, size=(24, 16)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(colour=RED, size=(24, 16)) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(png_bytes(colour, size))}}


def user(text: str, *images: dict) -> dict:
    """A user message in OpenAI's format: the image parts, then the text part."""
    return {"role": "user", "content": [*images, {"type": "text", "text": text}]}
