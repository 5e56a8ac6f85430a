"""Abuse test for `vistune serve`, loopback only: do abusive clients slow the others down or fill memory?

    python benchmarks/serve_abuse.py MODEL [--normal 16] [--abusive 8] [--seconds 60] [--threads 1]
        [--rss-budget-mb 2048] [--random-model]

`--random-model` first writes, at MODEL if nothing is there, a model of the quickstart's architecture
(configs/quickstart.yaml: SmolLM2-135M-Instruct, a ResNet on 64 px) with random vision and projector
weights: the same work per request as the trained quickstart model.

Starts `vistune serve MODEL` on a free loopback port with its default limits and runs `--normal` streaming
clients for `--seconds` (each request a question about its own 640x480 JPEG, `max_tokens` 8): once alone
(the unloaded run), then again while `--abusive` clients, a quarter of each kind (`--kinds` to choose),
send without pause:

- huge message lists: 4,001 alternating "hi" messages (a 75 KB body);
- huge text: one 30 MB text message;
- many large images: 8 PNGs of 5000x5000 pixels (84 KB each, within every per-image limit; new bytes
  each request, so the feature cache does not serve them);
- slowloris: a body that declares 1,000 bytes and sends 10, then waits.

Prints the normal clients' latency (p50/p95) in both runs and the ratio of the p95s (the goal: within 2x),
what the abusive clients got back (statuses, slowloris connections cut off), and the server's resident
memory: idle, the most in each run, and whether it stayed under `--rss-budget-mb`.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from base64 import b64encode
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import (  # noqa: E402  (a sibling script)
    QUESTIONS,
    _pct,
    _wait_healthy,
    image_message,
    photo_jpeg,
    rss_mb,
    stream_chat,
    unique,
)

MODEL = "bench"
KINDS = ("messages", "text", "images", "slowloris")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def big_png(side: int = 5000) -> bytes:
    """A flat side x side RGB PNG (about 84 KB for 5000: 75 MB once decoded)."""
    row = b"\0" + b"\x80" * (3 * side)
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    data = zlib.compress(row * side, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def tagged(png: bytes, n: int) -> bytes:
    """The same pixels with a text chunk naming `n`: new bytes (the server decodes them again)."""
    return png[:33] + _chunk(b"tEXt", f"n\0{n}".encode()) + png[33:]


def _body(messages: list) -> bytes:
    return json.dumps({"model": MODEL, "messages": messages, "max_tokens": 8}).encode()


def _post(url: str, body: bytes) -> int | str:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as err:
        return type(err).__name__
    finally:
        conn.close()


def slowloris(url: str) -> int | str:
    """Declare 1,000 bytes, send 10, wait: what the server answers when it cuts the connection off."""
    host, port = url.removeprefix("http://").split(":")
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    try:
        with socket.create_connection((host, int(port)), timeout=300) as sock:
            sock.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + b'{"model": ')
            answer = sock.recv(64)
            return int(answer.split()[1]) if answer.startswith(b"HTTP/") else "closed"
    except OSError as err:
        return type(err).__name__


def abuser(kind: str, url: str, stop_at: float, seen: Counter, lock: threading.Lock) -> None:
    """One abusive client of `kind`, sending without pause until `stop_at` (time.time())."""
    png = big_png() if kind == "images" else b""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(4001)]
    fixed = {"messages": _body(messages), "text": _body([{"role": "user", "content": "x" * 30_000_000}])}
    n = 0
    while time.time() < stop_at:
        if kind == "slowloris":
            status = slowloris(url)
        elif kind == "images":
            n += 1
            urls = [f"data:image/png;base64,{b64encode(tagged(png, n * 8 + k)).decode()}" for k in range(8)]
            parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            status = _post(url, _body([{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}]))
        else:
            status = _post(url, fixed[kind])
        with lock:
            seen[(kind, status)] += 1


def abusers(url: str, stop_at: float, kinds: list[str], out: multiprocessing.Queue) -> None:
    """One abusive client per entry of `kinds`, in threads of this (separate) process; their answers go
    to `out`. Apart from the normal clients, so that their Python work does not slow those down."""
    seen: Counter = Counter()
    lock = threading.Lock()
    threads = [
        threading.Thread(target=abuser, args=(kind, url, stop_at, seen, lock), daemon=True) for kind in kinds
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.time()) + 400)
    out.put(dict(seen))


def run(url: str, pid: int, args, abusive: int) -> dict:
    """`--normal` clients (and `abusive` abusers) for `--seconds`; memory sampled every half second."""
    jpeg, lock = photo_jpeg(640, 480), threading.Lock()
    latencies: list[float] = []
    statuses: Counter = Counter()
    counter, samples = iter(range(10**9)), []
    stop_at = time.perf_counter() + args.seconds  # the abusers' process counts in time.time()

    def client() -> None:
        while time.perf_counter() < stop_at:
            with lock:
                n = next(counter)
            message = image_message(unique(jpeg, n), QUESTIONS[n % len(QUESTIONS)])
            result = stream_chat(url, None, MODEL, [message], 8)
            with lock:
                statuses[result.status] += 1
                if result.status == 200:
                    latencies.append(result.latency)

    def sampler() -> None:
        while time.perf_counter() < stop_at + 2:
            samples.append(rss_mb(pid) or 0.0)
            time.sleep(0.5)

    answers: multiprocessing.Queue = multiprocessing.Queue()
    kinds = [args.kinds[k % len(args.kinds)] for k in range(abusive)]
    others = multiprocessing.Process(target=abusers, args=(url, time.time() + args.seconds, kinds, answers))
    if abusive:
        others.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(args.normal)]
    for t in [*threads, threading.Thread(target=sampler, daemon=True)]:
        t.start()
    for t in threads:
        t.join(args.seconds + 400)
    abused = answers.get(timeout=600) if abusive else {}
    if abusive:
        others.join(60)
    got = {f"{kind} {status}": n for (kind, status), n in sorted(abused.items(), key=str)}
    return {
        "ok": len(latencies), "statuses": dict(statuses), "p50": _pct(latencies, 50),
        "p95": _pct(latencies, 95), "rss_max": max(samples, default=0.0), "abused": got,
    }  # fmt: skip


@contextmanager
def server(args):
    """`vistune serve MODEL` with its default limits on a free loopback port: (url, pid)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "vistune.cli", "serve", args.model, "--port", str(port),
               "--model-name", MODEL, "--log-level", "warning"]  # fmt: skip
    command += ["--threads", str(args.threads)] if args.threads else []
    proc = subprocess.Popen(
        command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
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


def random_model(path: Path) -> None:
    """The quickstart's architecture with random tower and projector weights, saved at `path`."""
    import torch

    from vistune.config import load_config
    from vistune.model.vlm import build_vlm, save_vlm

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml", [])
    torch.manual_seed(0)
    save_vlm(build_vlm(cfg.model).eval(), path)


def report(label: str, f: dict) -> None:
    print(f"[{label}] {f['ok']} normal requests answered, statuses {f['statuses']}; latency p50 "
          f"{f['p50']:.2f} s, p95 {f['p95']:.2f} s; server RSS at most {f['rss_max']:.0f} MiB")  # fmt: skip
    if f["abused"]:
        print(f"  abusive clients got: {f['abused']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a vistune model dir to serve")
    p.add_argument("--normal", type=int, default=16)
    p.add_argument("--abusive", type=int, default=8)
    p.add_argument("--kinds", type=lambda s: s.split(","), default=list(KINDS), help="comma-separated")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--threads", type=int, help="torch threads of the server")
    p.add_argument("--rss-budget-mb", type=float, default=2048.0, help="the most the server may hold")
    p.add_argument("--random-model", action="store_true", help="write a random quickstart model at MODEL")
    args = p.parse_args()
    if args.random_model and not Path(args.model).exists():
        random_model(Path(args.model))
    with server(args) as (url, pid):
        for k in range(3):  # warm-up: first calls pay one-time costs
            stream_chat(url, None, MODEL, [image_message(unique(photo_jpeg(640, 480), -1 - k), "hi")], 4)
        idle = rss_mb(pid) or 0.0
        alone = run(url, pid, args, 0)
        report(f"{args.normal} normal clients alone, {args.seconds:g} s", alone)
        abused = run(url, pid, args, args.abusive)
        report(f"{args.normal} normal clients with {args.abusive} abusive ones, {args.seconds:g} s", abused)
        after = rss_mb(pid) or 0.0
    ratio = abused["p95"] / alone["p95"]
    peak = max(alone["rss_max"], abused["rss_max"])
    verdict = "met" if ratio <= 2 else "NOT met"
    print(f"p95 latency under abuse / alone: {ratio:.2f}x (goal: at most 2x): {verdict}")
    print(f"server RSS: idle {idle:.0f} MiB, at most {peak:.0f} MiB, after {after:.0f} MiB; budget "
          f"{args.rss_budget_mb:.0f} MiB: {'within' if peak <= args.rss_budget_mb else 'OVER'}")  # fmt: skip


if __name__ == "__main__":
    main()
