"""Bad inputs to `vistune chat`: each answered with a clear error naming what is wrong,
or a counted skip (the corpus and its runner: tests/bad_inputs.py)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from bad_inputs import (
    Case,
    World,
    _damaged,
    _png,
    gigapixel_png,
    params,
    run_case,
)

# --- chat -------------------------------------------------------------------------------------------------


def _chat(
    name: str, needles: tuple[str, ...], argv: Callable[[Path, World], list[str]], code: int = 2, **kw
) -> Case:
    return Case("chat", name, lambda tmp, world: ["chat", *argv(tmp, world)], code, needles, **kw)


def _ask(*args: str) -> Callable[[Path, World], list[str]]:
    """`chat MODEL --prompt hi --max-new-tokens 2 ARGS`; ARGS may hold {tmp}."""
    return lambda tmp, world: [
        str(world.model),
        "--prompt",
        "hi",
        "--max-new-tokens",
        "2",
        *(a.format(tmp=tmp) for a in args),
    ]


def _with_file(make: Callable[[Path], Any], argv: Callable[[Path, World], list[str]]) -> Callable:
    def both(tmp: Path, world: World) -> list[str]:
        make(tmp)
        return argv(tmp, world)

    return both


def _said(*needles: str) -> Callable[[Path, str], None]:
    def check(tmp: Path, output: str) -> None:
        for needle in needles:
            assert needle in output, needle

    return check


def chat_cases() -> list[Case]:
    """`vistune chat MODEL`: missing or damaged models, bad images and flags; a bad /image keeps the chat."""
    corrupt_json = lambda m: (m / "vistune.json").write_text("{not json")  # noqa: E731
    return [
        _chat("model-missing", ("no-model",), lambda t, w: [str(t / "no-model"), "--prompt", "hi"]),
        _chat(
            "model-dir-empty",
            ("empty", "cannot load its tokenizer"),
            lambda t, w: (t / "empty").mkdir() or [str(t / "empty"), "--prompt", "hi"],
        ),
        _chat("model-json-corrupt", ("vistune.json",), _damaged(corrupt_json, "--prompt", "hi")),
        _chat(
            "model-weights-missing",
            ("vision_projector.safetensors",),
            _damaged(lambda m: (m / "vision_projector.safetensors").unlink(), "--prompt", "hi"),
        ),
        _chat("model-llm-missing", ("llm",), _damaged(lambda m: shutil.rmtree(m / "llm"), "--prompt", "hi")),
        _chat("image-missing", ("nothere.png", "missing image"), _ask("--image", "{tmp}/nothere.png")),
        _chat(
            "image-not-an-image",
            ("notes.png", "unreadable image"),
            _with_file(lambda t: (t / "notes.png").write_text("hello"), _ask("--image", "{tmp}/notes.png")),
        ),
        _chat(
            "image-gigapixel",
            ("big.png", "too-large image"),
            _with_file(
                lambda t: (t / "big.png").write_bytes(gigapixel_png()), _ask("--image", "{tmp}/big.png")
            ),
        ),
        _chat(
            "image-to-a-plain-llm",
            ("--image", "plain language model"),
            lambda t, w: [
                str(w.llm),
                "--prompt",
                "hi",
                "--max-new-tokens",
                "2",
                "--image",
                str(_png(t / "a.png")),
            ],
        ),
        _chat("max-new-tokens-zero", ("--max-new-tokens",), _ask("--max-new-tokens", "0")),
        _chat(
            "prompt-not-utf8",
            ("turn 0 (user)", "not valid Unicode"),
            lambda t, w: [str(w.model), "--prompt", "caf\udce9"],
        ),
        _chat("max-new-tokens-not-a-number", ("--max-new-tokens", "'x'"), _ask("--max-new-tokens", "x")),
        _chat("temperature-negative", ("--temperature",), _ask("--temperature", "-1")),
        _chat("top-p-above-one", ("--top-p",), _ask("--temperature", "1", "--top-p", "1.5")),
        _chat("top-p-zero", ("--top-p",), _ask("--temperature", "1", "--top-p", "0")),
        _chat(
            "interactive-image-missing",
            ("nothere.png", "missing image"),
            lambda t, w: [str(w.model)],
            code=0,
            stdin="/image {tmp}/nothere.png\n/quit\n",
            expect="skip",
            check=_said("nothere.png"),
        ),
        _chat(
            "interactive-image-without-path",
            ("/image",),
            lambda t, w: [str(w.model), "--max-new-tokens", "2"],
            code=0,
            stdin="/image\n/quit\n",
            expect="skip",
            check=_said("error", "/image PATH"),
        ),
    ]


CASES = chat_cases()


@pytest.mark.parametrize("case", params(CASES))
def test_bad_input(case: Case, tmp_path, request, capsys, monkeypatch):
    run_case(case, tmp_path, request, capsys, monkeypatch)
