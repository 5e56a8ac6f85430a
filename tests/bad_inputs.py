"""The bad-input corpus's shared parts: what a case is, the small writers that make bad files, and the
runner. Every command answers a bad input with a clear error or a counted skip.

Each area's cases live beside its other tests (`AREAS`): one function per command (`validate_cases`,
`synth_cases`, `train_cases`, `chat_cases`, `eval_cases`, `export_cases`, `serve_cases`) returns `Case`s:
a name, a setup that writes what the case needs into its own tmp dir and returns the command line (or,
for the server, the HTTP request), and what must come back:

- `error`: the exit status (2: bad input, one message; `data validate`: 1, a report listing the problem
  kind and record id) and substrings of the message that name the file, record, field or flag;
- `skip`: exit 0 with the skip counted where a user sees it (`skipped_bad` in metrics.jsonl, failures in
  eval's metrics), checked by the case's `check`.

`run_case` runs a case in-process through `vistune.cli.main` (the server's cases against a tiny model
served on a loopback port) in a thread with a deadline, and asserts the status, the naming substrings,
no traceback and no hang. Everything shares a tiny random Llama and tiny saved VLMs (`World`); cases that
would train stop at validation or train one step. tests/test_bad_corpus.py prints the count by command.
"""

from __future__ import annotations

import http.client
import importlib.util
import io
import json
import logging
import shutil
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import broken_images
import numpy as np
import pytest
from PIL import Image

from vistune import cli
from vistune.data.images import ImageError, load_image

TIMEOUT_S = 120  # per case; a case that takes longer is a hang
COMMANDS = ("validate", "synth", "train", "chat", "eval", "export", "serve")
KEY = "sk-corpus-key"
SERVED = "tiny-vlm"
# command -> the test file (under tests/) that holds its cases
AREAS = {
    "validate": "data/test_bad_validate.py",
    "synth": "shapes/test_bad_synth.py",
    "train": "train/test_bad_train.py",
    "chat": "infer/test_bad_chat.py",
    "eval": "eval/test_bad_eval.py",
    "export": "interop/test_bad_export.py",
    "serve": "infer/test_bad_serve.py",
}


# --- what a case is ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """One raw HTTP request to the test server."""

    body: bytes | dict | list | None = None
    method: str = "POST"
    path: str = "/v1/chat/completions"
    key: str | None = KEY
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Case:
    """One bad input and the answer it must get.

    setup(tmp, world) writes the case's files into `tmp` and returns the argv of `vistune` (CLI cases).
    `request` is the HTTP request instead (server cases): `status`, `param` and `needles` are checked
    against the OpenAI-shaped error. `code` is the exit status; `needles` must all appear in the message
    (stderr; stdout for `data validate` reports). `check(tmp, output)` confirms a counted skip.
    """

    command: str
    name: str
    setup: Callable[[Path, World], list[str]] | None = None
    code: int = 2
    needles: tuple[str, ...] = ()
    expect: str = "error"  # or "skip"
    check: Callable[[Path, str], None] | None = None
    stdin: str | None = None
    request: Request | None = None
    status: int = 400
    param: str | None = None
    xfail: str | None = None

    @property
    def id(self) -> str:
        return f"{self.command}-{self.name}"


@dataclass
class World:
    """What cases share: a module tmp dir, the tiny LLM, tiny saved VLMs (built on first use)."""

    root: Path
    llm: Path
    make_vlm: Callable[..., Any]

    def _saved(self, name: str, kind: str, projector: str) -> Path:
        from vistune.model.vlm import save_vlm

        out = self.root / name
        save_vlm(self.make_vlm(kind, projector, seed=3), out)
        return out

    @cached_property
    def model(self) -> Path:
        """A tiny CLIP + mlp2x_gelu VLM dir (exportable)."""
        return self._saved("model", "clip", "mlp2x_gelu")

    @cached_property
    def resampler_model(self) -> Path:
        return self._saved("model-resampler", "clip", "resampler")

    @cached_property
    def resnet_model(self) -> Path:
        return self._saved("model-resnet", "resnet", "mlp2x_gelu")

    def model_copy(self, tmp: Path) -> Path:
        """A copy of the tiny model dir in `tmp`, to damage."""
        return Path(shutil.copytree(self.model, tmp / "model"))


# --- small writers ----------------------------------------------------------------------------------------


def _png(path: Path, size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _noisy_png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def gigapixel_png() -> bytes:
    """A valid little PNG whose header declares 100000 x 100000 pixels."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def _bad_jpeg(folder: Path) -> Path:
    """A progressive JPEG cut short with an end marker appended, one that `load_image` cannot decode."""
    for path in broken_images.progressive_jpeg_cuts(folder):
        try:
            load_image(path)
        except ImageError:
            return path
    raise AssertionError("no cut of the progressive JPEG fails to decode")


def _rec(rid: str, image: str | None = "ok.png", conv: list | None = None, **extra) -> dict:
    conv = conv if conv is not None else [["human", "<image>\nWhat is it?"], ["gpt", "A square."]]
    out = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in conv], **extra}
    if image is not None:
        out["image"] = image
    return out


def _json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --- damaged models ---------------------------------------------------------------------------------------


def _broken(damage: Callable[[Path], Any]) -> Callable[[Path, World], Path]:
    """The tiny model copied into tmp, then damaged."""

    def model(tmp: Path, world: World) -> Path:
        copy = world.model_copy(tmp)
        damage(copy)
        return copy

    return model


def _damaged(damage: Callable[[Path], Any], *args: str) -> Callable[[Path, World], list[str]]:
    """`MODEL ARGS` with MODEL a damaged copy of the tiny model."""
    return lambda tmp, world: [str(_broken(damage)(tmp, world)), *args]


# --- the corpus and its runner ----------------------------------------------------------------------------


def params(cases: list[Case]) -> list[Any]:
    """The cases as pytest parameters (a known defect as a strict xfail); ids must be unique."""
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted(i for i, n in Counter(ids).items() if n > 1)
    return [_param(c) for c in cases]


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else []
    return pytest.param(case, id=case.id, marks=marks)


def _serving():
    """tests/infer/serving.py (the server tests' helper), imported once under its own name."""
    if "serving" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "serving", Path(__file__).parent / "infer" / "serving.py"
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["serving"] = module
        spec.loader.exec_module(module)
    return sys.modules["serving"]


def _in_thread(fn: Callable[[], Any], timeout: float) -> Any:
    """fn() in a thread; fail the test as a hang if it has not returned after `timeout` seconds."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - reported below
            result["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"hang: no answer after {timeout} s")
    if "error" in result:
        err = result["error"]
        text = "".join(traceback.format_exception(err))
        pytest.fail(f"an exception escaped: {type(err).__name__}: {err}\n{text}")
    return result["value"]


def _main(argv: list[str]) -> int:
    """`vistune ARGV` as the console script runs it (argparse's usage errors exit 2 through SystemExit)."""
    try:
        return cli.main(argv)
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)


def _run_cli(case: Case, tmp: Path, world: World, capsys, monkeypatch) -> None:
    argv = case.setup(tmp, world)
    if case.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(case.stdin.format(tmp=tmp)))
    if case.command == "serve":  # a case that got past its error must not start serving

        def refuse(*args, **kwargs):
            raise AssertionError("the server would have started")

        monkeypatch.setattr("uvicorn.run", refuse)
        monkeypatch.setattr("uvicorn.Server.run", refuse)
    capsys.readouterr()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        code = _in_thread(lambda: _main(argv), TIMEOUT_S)
    finally:
        root.handlers[:], root.level = handlers, level  # `serve` configures logging onto captured streams
    out, err = capsys.readouterr()
    both = out + err
    assert "Traceback" not in both, both
    assert code == case.code, f"exit {code}, expected {case.code}\n--- stdout\n{out}\n--- stderr\n{err}"
    message = out if case.command == "validate" and case.code == 1 else err
    for needle in case.needles:
        assert needle in message, f"{needle!r} not in the message:\n{message}"
    if case.expect == "error" and case.code == 2:
        assert "error:" in err, err  # the one line of `vistune CMD: error: ...` (or argparse's)
    if case.check is not None:
        case.check(tmp, both)


def _send(base_url: str, request: Request) -> tuple[int, str]:
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT_S)
    headers = dict(request.headers)
    if request.key:
        headers["Authorization"] = f"Bearer {request.key}"
    body = request.body
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        conn.request(request.method, request.path, body, headers)
        response = conn.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        conn.close()


def _run_http(case: Case, base_url: str) -> None:
    assert case.request is not None
    status, text = _in_thread(lambda: _send(base_url, case.request), TIMEOUT_S)
    assert "Traceback" not in text, text
    assert status == case.status, f"HTTP {status}, expected {case.status}: {text}"
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == case.param, error
    for needle in case.needles:
        assert needle in error["message"], f"{needle!r} not in {error['message']!r}"


def serve(world: World) -> Iterator[str]:
    """The tiny model served on a loopback port with a key and small caps; yields its URL."""
    from vistune.infer.engine import ServeConfig
    from vistune.infer.generate import load_generator
    from vistune.infer.server import create_app

    config = ServeConfig(
        model_name=SERVED,
        api_key=KEY,
        max_body_bytes=200_000,
        max_image_bytes=50_000,
        max_image_pixels=1_000_000,
    )
    with _serving().running(create_app(load_generator(str(world.model), device="cpu"), config)) as url:
        yield url


def run_case(case: Case, tmp_path: Path, request: pytest.FixtureRequest, capsys, monkeypatch) -> None:
    """One bad input: the expected status, a message naming what is wrong (or a counted skip), no traceback,
    no hang (`corpus_world` and `corpus_server` are fixtures of tests/conftest.py)."""
    world = request.getfixturevalue("corpus_world")
    start = time.monotonic()
    if case.request is not None:
        _run_http(case, request.getfixturevalue("corpus_server"))
    else:
        _run_cli(case, tmp_path, world, capsys, monkeypatch)
    assert time.monotonic() - start < TIMEOUT_S


def area_cases() -> dict[str, list[Case]]:
    """Every area's cases, by command, read from the test files that hold them."""
    found = {}
    for command, where in AREAS.items():
        path = Path(__file__).parent / where
        spec = importlib.util.spec_from_file_location(f"bad_inputs_{command}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found[command] = module.CASES
    return found
