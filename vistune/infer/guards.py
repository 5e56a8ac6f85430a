"""Guards in front of the routes: the API key, the body cap (413) and deadline (408), errors in OpenAI's
shape, query strings kept out of the access log, the bind warning.

Keys are compared in constant time (on their SHA-256, so not even the length leaks). A body over the
cap is refused from its Content-Length, or, for a chunked body, as soon as the bytes read pass the cap,
before the app sees it; a body that has not wholly arrived within the deadline (a client that declares
more than it sends, or sends a byte now and then) is answered 408 and its connection closed. Every error
(validation, routing, a crash) is answered as `{"error": {"message", "type", "param", "code"}}`; a
crash's traceback goes to the server log only, and validation messages name fields without echoing
their values (which may be megabytes of base64). The access log shows paths without their query strings
(a key sent as `?api_key=...` is not written down).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vistune.infer.api import APIError

log = logging.getLogger("vistune.serve")


def authorizer(api_key: str | None):
    """A dependency that checks `Authorization: Bearer KEY` in constant time (or nothing, without a key)."""
    expected = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("this server needs an API key: send the header Authorization: Bearer KEY")
        if not hmac.compare_digest(given, expected):
            raise _unauthorized("incorrect API key provided")

    return authorize


def _unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets a 413 before it is read further, and one not
    wholly arrived `timeout_s` after the request's headers gets a 408; both close the connection."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 30.0, refusal_delay_s: float = 0.0):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.refusal_delay_s = refusal_delay_s  # a 413 waits this long: a client repeating it is slowed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(scope, receive, send, 413)
        deadline = time.monotonic() + self.timeout_s
        size, chunks, last = 0, [], None
        while True:  # read (at most max_bytes of) the body by the deadline, then replay it to the app
            try:
                last = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:  # TimeoutError from Python 3.11 on
                return await self._refuse(scope, receive, send, 408)
            chunks.append(last.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send, 413)
            if last["type"] != "http.request" or not last.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        if last["type"] != "http.request":
            pending = [last]  # the client left: the app hears so
        del chunks  # only the joined copy stays, until the app takes it

        async def replay():
            return pending.pop(0) if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, status: int) -> None:
        if status == 408:
            error = APIError(408, f"the request body did not arrive within {self.timeout_s:g} s "
                             "(--body-timeout)", code="request_timeout")  # fmt: skip
        else:
            error = APIError(413, f"the request body is over this server's limit of {self.max_bytes} bytes "
                             "(--max-body-mb)", code="request_too_large")  # fmt: skip
            await self._drain(receive, self.refusal_delay_s)
        await JSONResponse(error.body(), status, headers={"Connection": "close"})(scope, receive, send)

    @staticmethod
    async def _drain(receive, seconds: float) -> None:
        """The refusal's pause: what the client still sends is read and dropped meanwhile, so that the
        connection closes with nothing unread (which would reset it before the client reads the 413)."""
        deadline = time.monotonic() + seconds
        try:
            while (left := deadline - time.monotonic()) > 0:
                message = await asyncio.wait_for(receive(), left)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
        except asyncio.TimeoutError:
            return
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


class QueryRedactor(logging.Filter):
    """Removes query strings from uvicorn's access log lines: keys sent in URLs are never written down."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?[query removed]", *args[3:])
        return True


def redact_access_log() -> None:
    """Install `QueryRedactor` on uvicorn's access logger (once)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, QueryRedactor) for f in access.filters):
        access.addFilter(QueryRedactor())


# Why FastAPI could not parse a JSON body, by the exception behind its "error parsing the body".
_UNREADABLE_BODY = {UnicodeDecodeError: "it is not UTF-8 text", RecursionError: "nested too deeply to read"}


def install_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; tracebacks go to the server log only."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (
            f"no route {request.method} {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        )
        unreadable = _UNREADABLE_BODY.get(type(exc.__cause__)) if exc.status_code == 400 else None
        message = f"the body is not valid JSON ({unreadable})" if unreadable else message
        return await api_error(request, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse(APIError(500, "internal server error; see the server log").body(), 500)


_NOT_AN_OBJECT = ("model_attributes_type", "model_type", "dict_type")  # a body that is not a JSON object


def validation_error(errors: list[dict]) -> APIError:
    """Pydantic's errors as one 400 naming the fields (never echoing their values back)."""
    problems: list[tuple[str, str]] = []
    for err in errors:
        loc = _dotted(err["loc"])
        if err["type"] == "string_type" and err["loc"][-1] == "str" and len(errors) > 1:
            continue  # `content` is a string or a list of parts: report the list's problems
        if err["type"] == "extra_forbidden":
            message = "this field is not supported by this server"
        elif tuple(err["loc"]) == ("body",) and err["type"] in _NOT_AN_OBJECT:
            message = "the body must be a JSON object, sent with Content-Type: application/json"
        elif err["type"] == "json_invalid":
            loc, message = "", f"the body is not valid JSON (at character {err['loc'][-1]})"
        else:
            message = err["msg"]
        problems.append((loc, message))
    text = "; ".join(f"{loc}: {message}" if loc else message for loc, message in problems[:5])
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    param = (problems[0][0] or None) if problems else None
    return APIError(400, text + more, param, "invalid_request")


def _dotted(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 'list[...]', 1, 'text') -> 'messages[0].content[1].text'."""
    out, previous = "", None
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part != previous and not re.search(r"[\[\]]", part) and part not in ("str", "list"):
            out += f".{part}" if out else part  # a part's type tag repeats its field name: said once
        previous = part
    return out


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server is reachable beyond this machine and takes no key."""
    if api_key:
        return None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (
        f"serving on {host} without an API key: anyone who can reach it can use the model. "
        "Set VISTUNE_API_KEY (or --api-key), or bind 127.0.0.1."
    )
