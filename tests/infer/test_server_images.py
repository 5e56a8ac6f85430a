"""Images for the server: which addresses a remote image may come from, the fetcher's checks at every hop
(against local HTTP servers, with a test policy that lets 127.0.0.1 through), data URIs and safe decoding."""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image
from serving import RED, data_uri, png_bytes

from vistune.infer.api import APIError
from vistune.infer.image_input import (
    FetchError,
    ImageLimits,
    RemoteFetcher,
    blocked_reason,
    decode_image,
    image_bytes,
)


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.0.10", "private"),
        ("169.254.169.254", "metadata"), ("100.100.100.200", "metadata"), ("fd00:ec2::254", "metadata"),
        ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fc00::1", "private"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
        ("::", "unspecified"), ("240.0.0.1", "reserved"), ("100.64.0.1", "public"), ("198.18.0.1", "private"),
        ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("2002:7f00:1::", "loopback"),
        ("8.8.8.8", None), ("93.184.216.34", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
    ],
)  # fmt: skip
def test_blocked_addresses(address, reason):
    found = blocked_reason(ipaddress.ip_address(address))
    assert (found is None) if reason is None else (reason in found), found


class _Site:
    """A local HTTP server on `host` that records requests; routes map paths to (status, headers, body)."""

    def __init__(self, host: str, routes: dict, delay: float = 0.0):
        self.seen: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                site.seen.append(self.path)
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                for k in range(0, len(body), 1000):
                    time.sleep(delay)
                    self.wfile.write(body[k : k + 1000])

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _only_first_loopback(ip):
    """A test policy: 127.0.0.1 passes (stands for a public site), everything else stays blocked."""
    return None if str(ip) == "127.0.0.1" else blocked_reason(ip) or "blocked by the test"


@pytest.fixture
def sites():
    made: list[_Site] = []

    def make(host="127.0.0.1", routes=None, delay=0.0):
        made.append(_Site(host, routes or {}, delay))
        return made[-1]

    yield make
    for site in made:
        site.close()


def test_fetches_an_allowed_address_and_checks_every_redirect_hop(sites):
    image = png_bytes(RED)
    inner = sites("127.0.0.2", {"/secret.png": (200, {"Content-Length": str(len(image))}, image)})
    outer = sites(routes={
        "/red.png": (200, {"Content-Length": str(len(image))}, image),
        "/moved": (302, {"Location": "/red.png"}, b""),
        "/inside": (302, {"Location": f"{inner.url}/secret.png"}, b""),
        "/file": (301, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    })  # fmt: skip
    fetcher = RemoteFetcher(10_000, 5.0, max_redirects=3, blocked=_only_first_loopback)
    assert fetcher.fetch(f"{outer.url}/red.png") == image
    assert fetcher.fetch(f"{outer.url}/moved") == image
    with pytest.raises(FetchError, match=r"resolves to 127\.0\.0\.2, a loopback address: refused"):
        fetcher.fetch(f"{outer.url}/inside")
    assert inner.seen == []  # the redirect target was checked before it was contacted
    with pytest.raises(FetchError, match="file: URL is refused"):
        fetcher.fetch(f"{outer.url}/file")
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetcher.fetch(f"{outer.url}/loop")
    with pytest.raises(FetchError, match="HTTP 404"):
        fetcher.fetch(f"{outer.url}/nothing")
    with pytest.raises(FetchError, match="credentials"):
        fetcher.fetch(outer.url.replace("http://", "http://user:pw@") + "/red.png")


def test_the_address_actually_connected_to_is_checked_before_sending(sites):
    site = sites(routes={"/red.png": (200, {}, png_bytes(RED))})
    checks: list[str] = []

    def first_check_passes(ip):  # the resolved address passes, the connected peer does not
        checks.append(str(ip))
        return None if len(checks) == 1 else "blocked on the second look"

    with pytest.raises(FetchError, match="second look"):
        RemoteFetcher(10_000, 5.0, blocked=first_check_passes).fetch(f"{site.url}/red.png")
    assert checks == ["127.0.0.1", "127.0.0.1"] and site.seen == []


def test_a_name_resolving_to_any_private_address_is_refused(monkeypatch):
    def resolve(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("93.184.216.34", "10.0.0.7")]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with pytest.raises(FetchError, match=r"resolves to 10\.0\.0\.7, a private address"):
        RemoteFetcher(10_000, 2.0).fetch("http://images.example.com/cat.png")


def test_byte_cap_and_deadline(sites):
    big = b"x" * 50_000
    site = sites(
        routes={"/declared": (200, {"Content-Length": str(len(big))}, big), "/undeclared": (200, {}, big)}
    )
    fetcher = RemoteFetcher(10_000, 5.0, blocked=_only_first_loopback)
    with pytest.raises(FetchError, match="50000 bytes, over the limit of 10000"):
        fetcher.fetch(f"{site.url}/declared")
    with pytest.raises(FetchError, match="more than the limit of 10000 bytes"):
        fetcher.fetch(f"{site.url}/undeclared")
    slow = sites(routes={"/slow": (200, {}, b"y" * 8000)}, delay=0.3)  # 8 pieces, 0.3 s apart
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        RemoteFetcher(100_000, 1.0, blocked=_only_first_loopback).fetch(f"{slow.url}/slow")
    assert time.monotonic() - started < 2.0


def test_image_bytes_schemes_and_data_uris():
    limits = ImageLimits(max_bytes=1000, max_pixels=10_000)
    image = png_bytes(RED, (8, 8))
    assert image_bytes(data_uri(image), "p", limits) == image
    assert image_bytes(data_uri(image).replace("image/png", "image/png;charset=binary"), "p", limits) == image
    cases = [
        ("data:text/plain;base64,aGk=", "data:image/<type>;base64"),
        ("data:image/png,rawbytes", "data:image/<type>;base64"),
        ("data:image/png;base64,not*base64", "malformed"),
        (data_uri(b"\0" * 2000), "over this server's limit of 1000 bytes"),
        ("https://example.com/a.png", "--allow-remote-images"),
        ("file:///etc/passwd", "scheme 'file' is refused"),
        ("ftp://example.com/a.png", "scheme 'ftp' is refused"),
        ("/etc/passwd", "scheme '(none)' is refused"),
    ]
    for url, words in cases:
        with pytest.raises(APIError) as err:
            image_bytes(url, "messages[0].content[0].image_url.url", limits)
        assert err.value.status == 400 and words in err.value.message, url
        assert err.value.param == "messages[0].content[0].image_url.url"


def _encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def test_decode_image_formats_modes_and_damage():
    rgba = Image.new("RGBA", (10, 6), (255, 0, 0, 0))  # fully transparent red: composited on white
    assert decode_image(_encoded(rgba, "PNG"), "p", 10_000).getpixel((0, 0)) == (255, 255, 255)
    frames = [Image.new("RGB", (8, 8), c) for c in ((0, 0, 255), (0, 255, 0))]
    gif = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert decode_image(gif, "p", 10_000).getpixel((0, 0))[2] > 200  # the first frame
    assert decode_image(_encoded(Image.new("L", (5, 5), 7), "JPEG"), "p", 10_000).mode == "RGB"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"  # Ghostscript's parser is never used
    for data, words in (
        (eps, "not a PNG"),
        (b"", "not a PNG"),
        (png_bytes(RED)[:60], "truncated or corrupt"),
    ):
        with pytest.raises(APIError, match=words):
            decode_image(data, "p", 10_000)
    with pytest.raises(APIError, match=r"100x101 = 10100 pixels, over this server's limit of 10000"):
        decode_image(_encoded(Image.new("RGB", (100, 101)), "PNG"), "p", 10_000)
