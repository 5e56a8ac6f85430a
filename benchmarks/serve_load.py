"""Load test for `vistune serve`, loopback only and bounded in time: N streaming clients for T seconds.

    python benchmarks/serve_load.py MODEL [--clients 64] [--seconds 60] [--one-by-one] [--follow-ups 5]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--pid PID] [--api-key KEY] [--model-name N]

With MODEL it starts `vistune serve MODEL` on a free loopback port (and stops it afterwards); with `--url`
it drives a server already running on this machine (`--pid` for its memory). Each client sends streamed
chat requests, each with its own image (photo-like JPEG bytes made unique per request, so the feature
cache does not flatter the figures), until T seconds have passed; requests still running then finish.

Prints requests/s, completion tokens/s, p50/p95/p99 of latency and time to first token (TTFT), errors by
status, and the server's resident memory before, during (max) and after the load. `--one-by-one` runs
the same load against a second server with `--max-batch 1` and prints the batched/one-by-one throughput
ratio. `--follow-ups K` (default 5, no other load) times K conversations of `--turns` turns (default 3):
the first turn about a new image, the last follow-up about the same image (its features and the
conversation's keys and values cached), and that follow-up again with new image bytes (recomputed),
and prints the TTFT ratios.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

QUESTIONS = [
    "What color is the circle?",
    "How many objects are there?",
    "Describe the image.",
    "Is there a star?",
]


@dataclass
class Result:
    status: int | str  # HTTP status, or the name of the exception that ended the request
    latency: float = 0.0
    ttft: float | None = None
    tokens: int = 0
    text: str = ""


def photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like picture (smooth shapes and gradients plus sensor noise) as JPEG bytes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y + 2 * x), np.sin(4 * (x + y))], -1) * 90 + 128
    noisy = base + rng.normal(0, 6, base.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def unique(jpeg: bytes, n: int) -> bytes:
    """The same pixels with a different comment: new bytes (a cache miss), the same decoding work."""
    comment = f"request {n}".encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(comment) + 2) + comment + jpeg[2:]  # after SOI


def image_message(jpeg: bytes, question: str) -> dict:
    url = "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()
    return {
        "role": "user",
        "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
    }


def first_message(args, jpeg: bytes, n: int) -> dict:
    """Request n's message: a question about a picture of its own (with --text-only: the question alone)."""
    question = QUESTIONS[n % len(QUESTIONS)]
    return (
        {"role": "user", "content": question} if args.text_only else image_message(unique(jpeg, n), question)
    )


def stream_chat(url: str, key: str | None, model: str, messages: list, max_tokens: int) -> Result:
    """One streamed request over a fresh connection: status, latency, time to first token, tokens."""
    parts = urlsplit(url)
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    started = time.perf_counter()
    result = Result(status=0)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
        response = conn.getresponse()
        result.status = response.status
        if response.status != 200:
            response.read()
        else:
            _read_events(response, result, started)
    except (OSError, http.client.HTTPException) as err:
        result.status = type(err).__name__
    finally:
        conn.close()
    result.latency = time.perf_counter() - started
    return result


def _read_events(response: http.client.HTTPResponse, result: Result, started: float) -> None:
    while line := response.readline():
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            result.status = f"stream-{event['error'].get('code') or 'error'}"
            return
        if event.get("usage"):
            result.tokens = event["usage"]["completion_tokens"]
        for choice in event.get("choices", []):
            if choice["delta"].get("content"):
                result.ttft = result.ttft or time.perf_counter() - started
                result.text += choice["delta"]["content"]


def rss_mb(pid: int | None) -> float | None:
    """Resident memory of a process in MiB (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def run_load(args, url: str, pid: int | None, jpeg: bytes) -> dict:
    """N clients for T seconds; a sampler records the server's memory every second."""
    results: list[Result] = []
    lock = threading.Lock()
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + args.seconds
    samples: list[float] = []

    def client(k: int) -> None:
        while time.perf_counter() < stop_at:
            with lock:
                n = next(counter)
            message = first_message(args, jpeg, n)
            result = stream_chat(url, args.api_key, args.model_name, [message], args.max_tokens)
            with lock:
                results.append(result)

    def sampler() -> None:
        while time.perf_counter() < stop_at + 1:
            if (mb := rss_mb(pid)) is not None:
                samples.append(mb)
            time.sleep(1.0)

    before = rss_mb(pid)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    started = time.perf_counter()
    for t in [*threads, threading.Thread(target=sampler, daemon=True)]:
        t.start()
    for t in threads:
        t.join(args.seconds + 300)  # in-flight requests finish (each has a 300 s timeout)
    elapsed = time.perf_counter() - started
    quarters = (
        [samples[min(len(samples) - 1, len(samples) * q // 4)] for q in (1, 2, 3, 4)] if samples else []
    )
    memory = {"rss_before": before, "rss_after": rss_mb(pid), "rss_max": max(samples, default=None)}
    return summarize(results, elapsed) | memory | {"rss_quarters": quarters}


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(results: list[Result], elapsed: float) -> dict:
    ok = [r for r in results if r.status == 200]
    latency, ttft = [r.latency for r in ok], [r.ttft for r in ok if r.ttft is not None]
    return {
        "requests": len(results), "ok": len(ok), "seconds": elapsed,
        "requests_per_s": len(ok) / elapsed, "tokens_per_s": sum(r.tokens for r in ok) / elapsed,
        "latency": {q: _pct(latency, q) for q in (50, 95, 99)},
        "ttft": {q: _pct(ttft, q) for q in (50, 95, 99)},
        "errors": dict(Counter(str(r.status) for r in results if r.status != 200)),
    }  # fmt: skip


def follow_ups(args, url: str, jpeg: bytes) -> dict:
    """Median TTFT, one request at a time, of: a first turn about a new image; the last follow-up of a
    conversation of `--turns` turns about the same image (its features and the conversation's keys and
    values cached); and that follow-up with new image bytes (nothing cached: recomputed)."""
    first, cached, uncached = [], [], []
    for k in range(args.follow_ups):
        history = [image_message(unique(jpeg, 10**8 + k), QUESTIONS[0])]  # bytes the server has not seen
        turns = [stream_chat(url, args.api_key, args.model_name, history, args.max_tokens)]
        for t in range(1, args.turns):
            history += [
                {"role": "assistant", "content": turns[-1].text},
                {"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]},
            ]
            turns.append(stream_chat(url, args.api_key, args.model_name, history, args.max_tokens))
        history[0] = image_message(unique(jpeg, 2 * 10**8 + k), QUESTIONS[0])
        control = stream_chat(url, args.api_key, args.model_name, history, args.max_tokens)
        if all(r.status == 200 and r.ttft for r in (*turns, control)):
            first.append(turns[0].ttft)
            cached.append(turns[-1].ttft)
            uncached.append(control.ttft)
    figures = {"pairs": len(first), "first": _pct(first, 50), "follow_up": _pct(cached, 50)}
    return figures | {"follow_up_uncached": _pct(uncached, 50), "turns": args.turns}


@contextmanager
def started_server(args, max_batch: int):
    """`vistune serve MODEL` on a free loopback port; yields (url, pid); stopped on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vistune.cli", "serve", args.model, "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--max-queue", str(args.max_queue), "--log-level", "warning"]
    command += ["--served-model-name", args.model_name] + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    if args.prefix_cache_mb is not None:
        command += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    parts = urlsplit(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("the server did not become healthy in time")


def measure(args, url: str, pid: int | None, jpeg: bytes, label: str) -> dict:
    for k in range(3):  # warm-up: first calls pay one-time costs
        stream_chat(
            url, args.api_key, args.model_name, [image_message(unique(jpeg, -1 - k), QUESTIONS[0])], 4
        )
    figures = run_load(args, url, pid, jpeg)
    report(label, figures)
    return figures


def report(label: str, f: dict) -> None:
    ms = lambda d: " / ".join("-" if v is None else f"{v * 1000:.0f}" for v in d.values())  # noqa: E731
    mb = lambda v: "-" if v is None else f"{v:.0f} MiB"  # noqa: E731
    print(f"\n[{label}] {f['requests']} requests ({f['ok']} ok) in {f['seconds']:.1f} s")
    print(f"  throughput: {f['requests_per_s']:.2f} requests/s, {f['tokens_per_s']:.1f} completion tokens/s")
    print(f"  latency p50/p95/p99: {ms(f['latency'])} ms;  TTFT p50/p95/p99: {ms(f['ttft'])} ms")
    print(f"  errors by status: {f['errors'] or 'none'}")
    print(
        f"  server RSS: before {mb(f['rss_before'])}, at each quarter of the run "
        f"{', '.join(mb(v) for v in f['rss_quarters'])}, max {mb(f['rss_max'])}, after {mb(f['rss_after'])}"
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", help="start `vistune serve MODEL` (or give --url)")
    p.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--pid", type=int, help="the running server's process id (for its memory)")
    p.add_argument("--api-key", default=os.environ.get("VISTUNE_API_KEY"))
    p.add_argument("--model-name", default="bench", help="model id to send (and serve, when started here)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16, help="of the server started here")
    p.add_argument("--max-queue", type=int, default=128, help="of the server started here")
    p.add_argument("--threads", type=int, help="torch threads of the server started here")
    p.add_argument("--image-size", default="640x480", help="WxH of the clients' pictures")
    p.add_argument(
        "--one-by-one", action="store_true", help="also run the load with --max-batch 1; print the ratio"
    )
    p.add_argument(
        "--follow-ups", type=int, default=5, help="conversations timed for follow-up TTFT (0: skip)"
    )
    p.add_argument("--turns", type=int, default=3, help="turns of each timed conversation (at least 2)")
    p.add_argument("--prefix-cache-mb", type=float, help="of the server started here (default: the server's)")
    p.add_argument("--text-only", action="store_true", help="questions without images (for a plain LLM)")
    p.add_argument("--json", help="also write the figures to this file")
    return p


def report_follow_ups(f: dict) -> None:
    first, cached, uncached = (f[key] * 1000 for key in ("first", "follow_up", "follow_up_uncached"))
    print(f"\n[follow-up turns, {f['pairs']} conversations of {f['turns']} turns, one at a time] TTFT p50:")
    print(f"  first turn {first:.0f} ms; turn {f['turns']}, image and prefix cached {cached:.0f} ms")
    print(
        f"  the same turn with new image bytes (recomputed): {uncached:.0f} ms; "
        f"reuse is {uncached / cached:.2f}x faster than recomputing ({first / cached:.2f}x the first turn)"
    )


def main() -> None:
    args = _parser().parse_args()
    if bool(args.model) == bool(args.url):
        raise SystemExit("give MODEL (to start a server) or --url (a running one), not both")
    if args.url and not ipaddress.ip_address(socket.gethostbyname(urlsplit(args.url).hostname)).is_loopback:
        raise SystemExit("loopback only: --url must point at this machine (127.0.0.1)")
    if args.one_by_one and args.url:
        raise SystemExit("--one-by-one starts its own servers: give MODEL")
    if args.turns < 2:
        raise SystemExit("--turns must be at least 2: a first turn and a follow-up")
    width, height = map(int, args.image_size.split("x"))
    jpeg = photo_jpeg(width, height)
    print(f"{args.clients} clients x {args.seconds:g} s, max_tokens {args.max_tokens}, {width}x{height} JPEG "
          f"({len(jpeg) // 1024} KiB), model {args.model or args.url}")  # fmt: skip
    figures = {}
    with started_server(args, args.max_batch) if args.model else _existing(args) as (url, pid):
        if args.seconds > 0:
            label = f"max batch {args.max_batch}" if args.model else url
            figures["batched"] = measure(args, url, pid, jpeg, label)
        if args.follow_ups and not args.text_only:
            figures["follow_ups"] = follow_ups(args, url, jpeg)
            report_follow_ups(figures["follow_ups"])
    if args.one_by_one and args.seconds > 0:
        with started_server(args, 1) as (url, pid):
            figures["one_by_one"] = measure(args, url, pid, jpeg, "max batch 1")
        ratio = figures["batched"]["requests_per_s"] / max(figures["one_by_one"]["requests_per_s"], 1e-9)
        tokens = figures["batched"]["tokens_per_s"] / max(figures["one_by_one"]["tokens_per_s"], 1e-9)
        print(f"\nbatched / one-by-one: {ratio:.2f}x requests/s, {tokens:.2f}x tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


@contextmanager
def _existing(args):
    yield args.url.rstrip("/"), args.pid


if __name__ == "__main__":
    main()
