"""`vistune serve MODEL`: an OpenAI-compatible HTTP API that takes images, and a web chat page.

Routes: `POST /v1/chat/completions` (a JSON reply, or server-sent events in OpenAI's chunk format with
`stream: true`, ending with `data: [DONE]`), `POST /v1/explain` (only with `--explain`: relevance maps of
an answer, `vistune.infer.explain`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health` and
the chat page at `/`. Requests that arrive together are batched (`vistune.infer.scheduler`).

Safe by default: binds 127.0.0.1 (the port is bound before the model loads, so a port in use is said at
once); with a key (`--api-key` or `VISTUNE_API_KEY`) every `/v1` route needs `Authorization: Bearer KEY`
(compared in constant time); remote image URLs are refused unless `--allow-remote-images`
(`vistune.infer.image_input`); the request body (413) and the time it may take to arrive (408), the
messages and their characters, bytes, pixels and decoded memory per image, images per request, the
memory of decoded images in flight, `max_tokens` and prompt length are capped. No request can stall
the others: bodies are parsed, images decoded and prompts rendered in worker threads (a bounded number
at a time) with the engine's own tokenizers, never under a lock the scheduler needs
(`vistune.infer.engine`). Errors come in OpenAI's shape and never carry a traceback; logs hold ids,
counts and times, never message text, images, keys or query strings (`vistune.infer.guards`). The
model's id is its name (the model dir's name, or `--model-name`), never a path. A client that
disconnects cancels its request: dropped if still queued, its batch row ended at the next decoding step
if running (`vistune.infer.decoding`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import copy
import ctypes
import errno
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from vistune.data.records import Turn
from vistune.infer.api import APIError, chunk, completion, new_id, usage
from vistune.infer.decoding import Delta, Done, Event, Failed, Job
from vistune.infer.engine import MB, Engine, Prepared, ServeConfig
from vistune.infer.explain import METHODS, Explainer, save_png
from vistune.infer.generate import Generator
from vistune.infer.guards import (
    BodyLimit,
    authorizer,
    exposure_warning,
    install_error_handlers,
    redact_access_log,
)
from vistune.infer.scheduler import QueueFull

log = logging.getLogger("vistune.serve")
DISCONNECT_POLL_S = 0.1
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # glibc's mallopt parameters


def create_app(generator: Generator, config: ServeConfig) -> FastAPI:
    """The ASGI app serving `generator` under `config`; its lifespan starts and stops the scheduler."""
    engine = Engine(generator, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.scheduler.start()
        yield
        engine.scheduler.stop()
        engine.workers.shutdown(wait=False, cancel_futures=True)

    # No /docs: FastAPI's docs pages load their scripts from a CDN, and this server works offline.
    app = FastAPI(title="vistune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    limits = {"timeout_s": config.body_timeout_s, "refusal_delay_s": config.refusal_delay_s}
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, **limits)
    install_error_handlers(app)
    redact_access_log()
    html, page_headers = web_page()

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(html, headers=page_headers)

    @app.get("/health")
    async def health() -> dict:
        s = engine.scheduler
        return {"status": "ok", "model": config.model_name, "images": engine.takes_images,
                "explain": config.explain and engine.takes_images, "queued": s.queued,
                "running": s.running}  # fmt: skip

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorizer(config.api_key))])
    model_card = {
        "id": config.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "vistune",
    }

    @v1.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card]}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id != config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist here", "model", "model_not_found")
        return model_card

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await _chat(engine, request)

    if config.explain and engine.takes_images:
        explaining = app.state.explaining = _Explaining(generator)

        @v1.post("/explain")
        async def explain(request: Request, method: str = "gradient") -> Response:
            return await _explain(engine, explaining, request, method)

    app.include_router(v1)
    return app


async def _prepare(engine: Engine, request: Request) -> Prepared:
    """The request parsed, checked and prepared in one of the engine's worker threads."""
    body = b"".join([part async for part in request.stream()])  # not kept on the request
    content_type = request.headers.get("content-type")
    work = asyncio.get_running_loop().run_in_executor(engine.workers, engine.prepare_body, body, content_type)
    del body
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:  # the server is stopping: what the worker prepares is given back
        work.add_done_callback(lambda w: w.cancelled() or w.exception() or w.result().lease.release())
        raise


# Refusals for a size limit (and 429s for image memory or decoding, whose Retry-After is 1 s): answered
# after the config's refusal delay.
SIZE_LIMITS = {"too_many_messages", "context_length_exceeded", "too_many_images", "image_too_large",
               "request_too_large", "image_memory_busy", "decoder_busy"}  # fmt: skip


async def _chat(engine: Engine, request: Request) -> Response:
    """Parse, check and prepare the request (in a worker thread), queue it, answer whole or streamed."""
    try:
        prepared = await _prepare(engine, request)
    except APIError as err:
        if err.code in SIZE_LIMITS:  # a client repeating it at once sends one per delay; nothing is held
            await asyncio.sleep(engine.config.refusal_delay_s)
        raise
    try:
        events: asyncio.Queue = asyncio.Queue()
        job = Job(
            prepared.prompt, prepared.images, prepared.max_tokens, _emitter(events),
            prepared.temperature, prepared.top_p, prepared.seed, prepared.stop,
        )  # fmt: skip
        try:
            engine.scheduler.submit(job)
        except QueueFull as err:
            headers = {"Retry-After": str(err.retry_after)}
            raise APIError(429, str(err), code="queue_full", headers=headers) from None
    except BaseException:
        prepared.lease.release()
        raise
    reply = _Reply(new_id(), engine.config.model_name, len(prepared.prompt), len(prepared.images))
    if not prepared.stream:
        return await _whole(events, job, reply, request, prepared)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return _Stream(_sse(events, job, reply, prepared), job, prepared, headers)


class _Explaining:
    """What `/v1/explain` computes with: an explainer on the served model (with a tokenizer of its own:
    the scheduler's is not shared), one thread, and the one slot an explanation holds while computed."""

    def __init__(self, generator: Generator):
        own = Generator(generator.llm, copy.deepcopy(generator.tokenizer), generator.vlm, batch_size=1)
        self.explainer = Explainer(own)
        self.thread = ThreadPoolExecutor(1, "vistune-explain")
        self.busy = False  # read and set on the event loop only

    def run(self, turns: list[Turn], images: list, answer: str | None, method: str, max_tokens: int) -> dict:
        """The explanation as the reply's JSON (overlays as PNG data URIs), in the explain thread."""
        try:
            found = self.explainer.explain(turns, images, answer, method, max_tokens)
        except ValueError as err:  # no image, an empty answer, over the context
            raise APIError(400, f"messages: {err}", "messages") from None
        body = found.to_json()
        for i, entry in enumerate(body["maps"]):
            png = io.BytesIO()
            save_png(found.overlay(i), png)
            entry["overlay"] = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        return body


async def _explain(engine: Engine, explaining: _Explaining, request: Request, method: str) -> Response:
    """`POST /v1/explain`: a chat request (the same key and limits), its answer mapped over its images.

    The last message may be the assistant's answer to explain; otherwise the model answers (greedy, at
    most `max_tokens`, 64 by default). `?method=` gradient (default), integrated or occlusion. One
    explanation is computed at a time: another meanwhile is answered 429."""
    if method not in METHODS:
        raise APIError(400, f"method {method!r} is not one of {list(METHODS)}", "method")
    body = b"".join([part async for part in request.stream()])
    work = asyncio.get_running_loop().run_in_executor(
        engine.workers, engine.prepare_explain, body, request.headers.get("content-type")
    )
    del body
    try:
        prepared, turns, answer = await work
    except APIError as err:
        if err.code in SIZE_LIMITS:
            await asyncio.sleep(engine.config.refusal_delay_s)
        raise
    try:
        if explaining.busy:
            raise APIError(429, "an explanation is being computed; this server computes one at a time",
                           code="explain_busy", headers={"Retry-After": "1"})  # fmt: skip
        explaining.busy = True
        try:
            images = [item.image for item in prepared.images]
            max_tokens = min(prepared.max_tokens, 64) if answer is None else prepared.max_tokens
            reply = await asyncio.get_running_loop().run_in_executor(
                explaining.thread, explaining.run, turns, images, answer, method, max_tokens
            )
        finally:
            explaining.busy = False
    finally:
        prepared.lease.release()
    log.info("explain: %d image(s), %s, %.2f s", len(images), method, reply["seconds"])
    return JSONResponse({"object": "explanation", "model": engine.config.model_name} | reply)


class _Stream(StreamingResponse):
    """A streamed reply that frees its request however it ends, even before its first byte (a client
    gone at once: Starlette then never starts the generator, whose `finally` would do it)."""

    def __init__(self, content: AsyncIterator[str], job: Job, prepared: Prepared, headers: dict[str, str]):
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.job, self.prepared = job, prepared

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancelled.set()
            self.prepared.lease.release()


class _Reply:
    """What a reply says about itself, and when it started (for the log line)."""

    def __init__(self, id_: str, model: str, prompt_tokens: int, images: int):
        self.id, self.model, self.prompt_tokens, self.images = id_, model, prompt_tokens, images
        self.started = time.monotonic()

    def logged(self, finish: str, completion_tokens: int) -> None:
        log.info(
            "%s: %d image(s), %d prompt + %d completion tokens, %s, %.2f s", self.id, self.images,
            self.prompt_tokens, completion_tokens, finish, time.monotonic() - self.started,
        )  # fmt: skip


def _emitter(events: asyncio.Queue) -> Callable[[Event], None]:
    """A thread-safe way for the scheduler to hand events to this request's handler."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the event loop has closed: the server is gone
            pass

    return emit


def _data(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(events: asyncio.Queue, job: Job, reply: _Reply, prepared: Prepared) -> AsyncIterator[str]:
    """The streamed reply; Starlette cancels this generator when the client disconnects."""
    usage_too = prepared.include_usage
    try:
        yield _data(chunk(reply.id, reply.model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if isinstance(event, Delta):
                yield _data(chunk(reply.id, reply.model, {"content": event.text}))
                continue
            if isinstance(event, Done):
                reply.logged(event.finish, event.completion_tokens)
                yield _data(chunk(reply.id, reply.model, {}, event.finish))
                if usage_too:
                    counts = usage(reply.prompt_tokens, event.completion_tokens)
                    yield _data(chunk(reply.id, reply.model, {}, usage_=counts))
            else:
                yield _data(event.error.body())
            break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once the row has finished; frees it when the client has gone
        prepared.lease.release()


async def _whole(
    events: asyncio.Queue, job: Job, reply: _Reply, request: Request, prepared: Prepared
) -> Response:
    """Wait for the whole reply, watching for the client going away meanwhile."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)
        job.cancelled.set()
        events.put_nowait(None)

    watcher = asyncio.create_task(watch())
    parts: list[str] = []
    try:
        while True:
            event = await events.get()
            if event is None:
                log.info("%s: the client disconnected; cancelled", reply.id)
                return Response(status_code=499)
            if isinstance(event, Failed):
                raise event.error
            if isinstance(event, Done):
                reply.logged(event.finish, event.completion_tokens)
                counts = usage(reply.prompt_tokens, event.completion_tokens)
                return JSONResponse(completion(reply.id, reply.model, "".join(parts), event.finish, counts))
            parts.append(event.text)
    finally:
        watcher.cancel()
        job.cancelled.set()
        prepared.lease.release()


def web_page() -> tuple[str, dict[str, str]]:
    """The chat page and its headers: a content security policy that allows only its own inline code."""
    html = (files("vistune.infer") / "web" / "index.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        found = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(
            f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in found
        )

    csp = (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "img-src 'self' data: blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    headers = {
        "Content-Security-Policy": csp,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    return html, headers


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 to 65535 (0: one the OS picks)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number 0-65535, got {port}")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vistune serve", description=__doc__.splitlines()[0])
    add = p.add_argument
    add("model", help="a vistune model dir, or an LLM for text only (hub id, local dir, smollm2)")
    add("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    add("--port", type=_port, default=8000, help="(default: 8000)")
    add("--api-key", default=os.environ.get("VISTUNE_API_KEY"),
        help="require Authorization: Bearer KEY on /v1 (default: $VISTUNE_API_KEY, else none)")  # fmt: skip
    add("--model-name", "--served-model-name", dest="model_name",
        help="the id clients send (default: the model dir's name; a run's OUT/model: the run's)")  # fmt: skip
    add("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    add("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    add("--max-batch", type=int, default=16, help="requests generated together (default: 16)")
    add("--max-wait-ms", type=float, default=10.0, help="how long a request waits for others (default: 10)")
    add("--max-queue", type=int, default=128, help="waiting requests before a 429 (default: 128)")
    add("--max-body-mb", type=float, default=32.0, help="request body cap, 413 above (default: 32)")
    add("--body-timeout", type=float, default=30.0,
        help="seconds a request body may take to arrive, 408 after (default: 30)")  # fmt: skip
    add("--refusal-delay", type=float, default=1.0,
        help="seconds before a refusal for a size limit is answered (default: 1; 0: at once)")  # fmt: skip
    add("--max-messages", type=int, default=512, help="messages per request (default: 512)")
    add("--max-prompt-chars", type=int,
        help="text characters per request, before tokenizing (default: 16 per prompt token)")  # fmt: skip
    add("--max-large-decodes", type=int, default=1,
        help="requests decoding non-JPEG images over 4 MP at once; 429 beyond (default: 1)")  # fmt: skip
    add("--max-image-memory-mb", type=float, default=512.0,
        help="decoded images of requests in flight: 413 if one cannot fit, 429 (default: 512)")  # fmt: skip
    add("--max-image-mb", type=float, default=10.0, help="bytes per image (default: 10)")
    add("--max-image-pixels", type=int, default=25_000_000, help="decoded pixels per image (default: 25e6)")
    add("--max-images", type=int, default=8, help="images per request (default: 8)")
    add("--max-tokens", type=int, default=1024, help="the most max_tokens a request may ask (default: 1024)")
    add("--max-prompt-tokens", type=int, help="prompt cap, images included (default: the model's context)")
    add("--feature-cache-mb", type=float, default=256.0, help="image-feature cache (default: 256)")
    add("--prefix-cache-mb", type=float, default=256.0,
        help="conversations' keys and values, reused by follow-ups (default: 256; 0: off)")  # fmt: skip
    add("--allow-remote-images", action="store_true", help="fetch http(s) image URLs, public addresses only")
    add("--explain", action="store_true",
        help="serve POST /v1/explain: answers' relevance maps (key and limits as chat)")  # fmt: skip
    add("--fetch-timeout", type=float, default=10.0, help="seconds per remote image (default: 10)")
    add("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def served_name(model: str) -> str:
    """The id a model is served as: a local dir's name (a training run's `OUT/model`: the run's name),
    else MODEL as given (a hub id, `smollm2`); never a path of this machine."""
    path = Path(model)
    if not path.is_dir():
        return model
    path = path.resolve()
    return path.parent.name if path.name == "model" and path.parent.name else path.name


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    return ServeConfig(
        model_name=args.model_name or served_name(args.model), api_key=args.api_key or None,
        max_body_bytes=int(args.max_body_mb * MB), body_timeout_s=args.body_timeout,
        refusal_delay_s=args.refusal_delay,
        max_messages=args.max_messages, max_prompt_chars=args.max_prompt_chars,
        max_image_memory_bytes=int(args.max_image_memory_mb * MB), max_large_decodes=args.max_large_decodes,
        max_image_bytes=int(args.max_image_mb * MB),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, max_tokens=args.max_tokens,
        max_prompt_tokens=args.max_prompt_tokens, allow_remote_images=args.allow_remote_images,
        fetch_timeout_s=args.fetch_timeout, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000,
        max_queue=args.max_queue, feature_cache_bytes=int(args.feature_cache_mb * MB),
        prefix_cache_bytes=int(args.prefix_cache_mb * MB), explain=args.explain,
    )  # fmt: skip


def main_serve(argv: list[str] | None = None) -> int:
    """`vistune serve`: load the model, then serve until interrupted."""
    import torch
    import uvicorn

    from vistune.infer.generate import load_generator

    args = _parser().parse_args(argv)
    config = config_from_args(args)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    warning = exposure_warning(args.host, config.api_key)
    if warning:
        log.warning(warning)
    if args.threads:
        torch.set_num_threads(args.threads)
    return_freed_memory()
    sock = listen(args.host, args.port)  # before the model loads: a port in use is said at once
    try:
        generator = load_generator(args.model, batch_size=config.max_batch, device=args.device)
        port = sock.getsockname()[1]
        log.info("serving %r (%s) on http://%s:%d", config.model_name,
                 "images and text" if generator.vlm else "text only", args.host, port)  # fmt: skip
        settings = uvicorn.Config(create_app(generator, config), log_level=args.log_level)
        redact_access_log()  # again: uvicorn's logging set-up came after the app's
        uvicorn.Server(settings).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def return_freed_memory() -> None:
    """glibc only: blocks of 4 MiB and more (decoded images, request bodies) are mapped and unmapped
    rather than kept in the heap, and threads share at most 4 heaps, so that memory a finished request
    frees goes back to the system and the server's memory levels off instead of creeping up."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 4 * MB)
        libc.mallopt(M_ARENA_MAX, 4)
    except (OSError, AttributeError):  # not glibc
        pass


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port, as uvicorn binds it; a one-line ValueError naming the port if not."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except (socket.gaierror, UnicodeError):
        sock.close()
        raise ValueError(f"--host {host!r}: not an address of this machine") from None
    except OSError as err:
        sock.close()
        why = "is already in use" if err.errno == errno.EADDRINUSE else f"cannot be bound ({err.strerror})"
        raise ValueError(f"--port {port}: {host}:{port} {why}; choose another --port or --host") from None
    sock.set_inheritable(True)
    return sock
