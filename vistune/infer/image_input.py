"""Images from chat requests, safely: data URIs always, remote URLs only when allowed and only if public.

- `data:image/...;base64,` URIs: strict base64, the byte cap checked from the length before decoding.
- `http(s)://` URLs, only with `--allow-remote-images`: the host is resolved once and every address it
  resolves to must be public (not loopback, private, link-local, multicast, reserved, unspecified,
  shared, or a cloud metadata address); the socket connects to one of those checked addresses and the
  peer address is checked again before a byte is sent (no DNS rebinding between check and use).
  Redirects are followed by hand, each hop checked the same way. A byte cap (Content-Length and counted)
  and one deadline for the whole fetch, enforced by a timer that shuts the socket. Proxies from the
  environment are not used; URLs with credentials are refused.
- Every other scheme (`file:`, `ftp:`, ...) is always refused.
- Decoding: only the PNG, JPEG, WebP, GIF and BMP parsers of Pillow (no EPS/Ghostscript and the like);
  the pixel count is read from the header and checked before any pixel data is decoded (decompression
  bombs), and the decoded size reserved from the server's image memory (`vistune.infer.memory`); a PNG
  must hold every row (the check `vistune data validate` makes: a truncated one is refused, never
  padded with black); first frame, EXIF orientation, RGB, downscaled by a whole factor to what the
  tower needs (JPEGs decoded at that scale).
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from PIL import Image, UnidentifiedImageError

from vistune.data.images import ImageError, decode_opened, open_header
from vistune.infer.api import APIError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
REDIRECTS = (301, 302, 303, 307, 308)
DATA_URI = re.compile(r"data:(image/[a-zA-Z0-9.+-]+)?((?:;[a-zA-Z0-9=._+-]+)*?);base64,", re.ASCII)
# Addresses that are global by the IANA tables but serve cloud instance metadata.
METADATA = {
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
}
IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class ImageLimits:
    """What one image may be: bytes, decoded pixels, and whether and how remote URLs are fetched."""

    max_bytes: int
    max_pixels: int
    allow_remote: bool = False
    timeout_s: float = 10.0
    max_redirects: int = 3


class FetchError(Exception):
    """A remote image that was not (or not fully) fetched; the message says why, in plain words."""


def blocked_reason(ip: IP) -> str | None:
    """Why a remote image may not come from `ip`, or None when it is a public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            inner = blocked_reason(embedded)
            return f"it embeds {embedded}, {inner}" if inner else None
    if ip in METADATA:
        return "a cloud metadata address"
    for kind in (
        "loopback",
        "link_local",
        "multicast",
        "unspecified",
        "reserved",
        "private",
    ):  # telling first
        if getattr(ip, f"is_{kind}"):
            return f"a {kind.replace('_', '-')} address"
    if not ip.is_global:
        return "not a public address"
    return None


def image_bytes(
    url: str, param: str, limits: ImageLimits, fetch: Callable[[str], bytes] | None = None
) -> bytes:
    """The bytes an `image_url.url` stands for; APIError 400 naming `param` when refused."""
    if url.startswith("data:"):
        return _data_uri(url, param, limits.max_bytes)
    scheme = urlsplit(url).scheme.lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise APIError(
            400, f"image URL scheme {scheme or '(none)'!r} is refused: send the image inline as a "
            "data:image/...;base64, URI (or an http(s) URL to a server started with --allow-remote-images)",
            param, "unsupported_image_url",
        )  # fmt: skip
    if not limits.allow_remote:
        message = (
            "remote image URLs are refused by this server; send the image inline as a data: URI, or "
            "start the server with --allow-remote-images to fetch public http(s) URLs"
        )
        raise APIError(400, message, param, "remote_images_disabled")
    fetcher = fetch or RemoteFetcher(limits.max_bytes, limits.timeout_s, limits.max_redirects).fetch
    try:
        return fetcher(url)
    except FetchError as err:
        raise APIError(400, f"could not fetch the image: {err}", param, "image_fetch_failed") from None


def _data_uri(url: str, param: str, max_bytes: int) -> bytes:
    match = DATA_URI.match(url)
    if not match or not match.group(1):
        raise APIError(
            400, "a data URI must read data:image/<type>;base64,<data>", param, "invalid_image_url"
        )
    payload = url[match.end() :]
    if len(payload) * 3 // 4 > max_bytes + 2:
        raise APIError(400, _too_many_bytes(len(payload) * 3 // 4, max_bytes), param, "image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise APIError(
            400, "the data URI's base64 payload is malformed", param, "invalid_image_url"
        ) from None
    if len(data) > max_bytes:
        raise APIError(400, _too_many_bytes(len(data), max_bytes), param, "image_too_large")
    return data


def _too_many_bytes(n: int, limit: int) -> str:
    return (
        f"the image is about {n} bytes, over this server's limit of {limit} bytes per image (--max-image-mb)"
    )


def decode_image(
    data: bytes,
    param: str,
    max_pixels: int,
    min_side: int | None = None,
    reserve: Callable[[int, str], None] | None = None,
) -> Image.Image:
    """RGB image from bytes: allowed formats only, pixel count checked from the header before decoding.

    `reserve(bytes, format)` is called with the decoded size (w x h x 3) and the format before any pixel
    is decoded (it raises to refuse); `min_side` downscales by a whole factor to no less than that on the
    shorter side."""
    fp = io.BytesIO(data)
    try:
        im = open_header(fp, formats=FORMATS)  # header only; Pillow's global limit untouched
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, "not a PNG, JPEG, WebP, GIF or BMP image", param, "invalid_image") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise APIError(
            400, f"the image declares {w}x{h} = {w * h} pixels, over this server's limit of {max_pixels} "
            "(--max-image-pixels); it was not decoded", param, "image_too_large",
        )  # fmt: skip
    if reserve is not None:
        try:
            reserve(w * h * 3, im.format or "")
        except APIError:
            im.close()
            raise
    try:
        return decode_opened(im, fp, param, min_side)
    except ImageError as err:
        if err.kind == "too-large image":  # Pillow's own check inside a decoder (GIF frames)
            raise APIError(400, "the image holds too many pixels", param, "image_too_large") from None
        message = f"the image data is truncated or corrupt ({err.detail})"
        raise APIError(400, message, param, "invalid_image") from None


class RemoteFetcher:
    """GET a public http(s) URL with address checks at every hop, a byte cap and one deadline."""

    def __init__(
        self,
        max_bytes: int,
        timeout_s: float,
        max_redirects: int = 3,
        blocked: Callable[[IP], str | None] = blocked_reason,
    ):
        self.max_bytes, self.timeout_s = max_bytes, timeout_s
        self.max_redirects, self.blocked = max_redirects, blocked

    def fetch(self, url: str) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        for _ in range(self.max_redirects + 1):
            status, location, body = self._get(url, deadline)
            if status not in REDIRECTS:
                if status != 200:
                    raise FetchError(f"the server answered HTTP {status}")
                return body
            if not location:
                raise FetchError(f"HTTP {status} redirect without a Location")
            url = urljoin(url, location)
        raise FetchError(f"more than {self.max_redirects} redirects")

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes]:
        """One request: (status, Location, body); the body only for a 200."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"a redirect to a {parts.scheme or 'relative'}: URL is refused")
        if parts.username is not None or parts.password is not None:
            raise FetchError("URLs with credentials are refused")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError("the URL's port is malformed") from None
        opened: list[socket.socket] = []
        conn = _connection(
            parts.scheme, parts.hostname, port, self._remaining(deadline), self._opener(opened)
        )
        expired = threading.Event()
        timer = threading.Timer(self._remaining(deadline), _shut, (opened, expired))
        timer.start()
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", target, headers={"User-Agent": "vistune-serve", "Accept": "image/*"})
            response = conn.getresponse()
            location = response.getheader("Location")
            result = (response.status, location, self._read(response) if response.status == 200 else b"")
        except (OSError, http.client.HTTPException) as err:
            if not expired.is_set():
                raise FetchError(f"connection failed ({type(err).__name__})") from None
        finally:
            timer.cancel()
            conn.close()
        if expired.is_set():  # the timer shut the socket: whatever was read is incomplete
            raise FetchError(f"timed out after {self.timeout_s:g} s")
        return result

    def _read(self, response: http.client.HTTPResponse) -> bytes:
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise FetchError(f"{length} bytes, over the limit of {self.max_bytes} bytes per image")
        body = bytearray()
        while chunk := response.read1(65536):
            body += chunk
            if len(body) > self.max_bytes:
                raise FetchError(f"more than the limit of {self.max_bytes} bytes per image")
        return bytes(body)

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timed out")
        return left

    def _opener(self, opened: list[socket.socket]) -> Callable[..., socket.socket]:
        """`socket.create_connection` for http.client: resolve once, check, connect, check the peer."""

        def open_checked(
            address: tuple[str, int], timeout: float | None = None, source=None
        ) -> socket.socket:
            host, port = address
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except (socket.gaierror, UnicodeError):
                raise FetchError(f"cannot resolve the host {host!r}") from None
            for *_, sockaddr in infos:
                self._check(host, sockaddr[0])
            failure: OSError | None = None
            for family, kind, proto, _, sockaddr in infos:
                sock = socket.socket(family, kind, proto)
                opened.append(sock)
                try:
                    sock.settimeout(timeout)
                    sock.connect(sockaddr)
                    self._check(host, sock.getpeername()[0])  # the address actually connected to
                    return sock
                except OSError as err:
                    sock.close()
                    failure = err
                except FetchError:
                    sock.close()
                    raise
            raise FetchError(f"cannot connect to {host!r} ({type(failure).__name__})")

        return open_checked

    def _check(self, host: str, address: str) -> None:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        reason = self.blocked(ip)
        if reason:
            raise FetchError(f"the host {host!r} resolves to {ip}, {reason}: refused")


def _connection(
    scheme: str, host: str, port: int, timeout: float, opener: Callable
) -> http.client.HTTPConnection:
    if scheme == "https":
        conn = http.client.HTTPSConnection(host, port, timeout=timeout, context=ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn._create_connection = opener  # every socket http.client opens goes through our checks
    return conn


def _shut(opened: list[socket.socket], expired: threading.Event) -> None:
    """The deadline passed: wake any blocked read on the fetch's sockets."""
    expired.set()
    for sock in opened:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
