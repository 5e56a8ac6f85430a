"""`vistune chat` checks the context as the server does (one line naming the sizes, nothing cut), and in a
session a refused message or a line that is not UTF-8 is reported and the session goes on."""

from __future__ import annotations

import io
import sys

import pytest

from vistune import cli
from vistune.infer.engine import Engine, ServeConfig
from vistune.infer.generate import load_generator
from vistune.infer.session import main_chat
from vistune.model.vlm import save_vlm

LONG = "word " * 3000  # about 3,000 tokens, against the tiny model's 512-token context


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-limits") / "m"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return out


@pytest.mark.parametrize(
    "flags, needles",
    [
        (["--prompt", LONG], ["the prompt is", "over the limit of 512"]),
        (["--prompt", "hi", "--max-new-tokens", "5000"], ["--max-new-tokens 5000", "512 tokens"]),
        (["--prompt", "hi", "--max-new-tokens", "500"], ["--max-new-tokens=500 need more than", "512"]),
        (["--prompt", "hi", "--system", LONG], ["--system: the prompt is", "over the limit of 512"]),
    ],
    ids=["long-prompt", "max-new-tokens-over-the-context", "prompt-and-max-new-tokens", "long-system"],
)
def test_what_does_not_fit_the_context_is_refused_in_one_line(model_dir, flags, needles, capsys):
    assert cli.main(["chat", str(model_dir), *flags]) == 2
    err = capsys.readouterr().err  # (after the weights' loading bar)
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("vistune chat: error: "), err
    assert all(n in lines[0] for n in needles), err


def test_chat_and_server_count_the_same_prompt_alike(model_dir, capsys):
    """The same words, refused by both with the same token count."""
    cli.main(["chat", str(model_dir), "--prompt", LONG])
    chat_error = capsys.readouterr().err
    from vistune.infer.api import APIError, ChatRequest

    config = ServeConfig(model_name="m", max_prompt_chars=10**6)  # the token check, not the text cap
    engine = Engine(load_generator(str(model_dir), device="cpu"), config)
    request = ChatRequest(model="m", messages=[{"role": "user", "content": LONG}])
    with pytest.raises(APIError) as err:
        engine.prepare(request)
    tokens = err.value.message.split("the prompt is ")[1].split(" tokens")[0]
    assert f"the prompt is {tokens} tokens" in chat_error and err.value.code == "context_length_exceeded"


def _session(monkeypatch, model_dir, typed: bytes, *flags: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(typed), encoding="utf-8"))
    return main_chat([str(model_dir), "--max-new-tokens", "2", *flags])


def test_a_line_that_is_not_utf8_is_reported_and_the_session_goes_on(model_dir, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr("vistune.infer.session.Session.ask", lambda self, text, *a, **k: asked.append(text))
    assert _session(monkeypatch, model_dir, b"first\ncaf\xe9 au lait\nsecond\n/quit\n") == 0
    assert asked == ["first", "second"]
    assert "error: line 2 of standard input is not UTF-8 text; skipped" in capsys.readouterr().err


def test_a_message_too_long_for_the_context_is_reported_and_goes_on(model_dir, monkeypatch, capsys):
    typed = f"{LONG}\nhello\n/quit\n".encode()
    assert _session(monkeypatch, model_dir, typed) == 0
    out, err = capsys.readouterr()
    assert "error: the prompt is" in err and "/reset starts over" in err
    assert len([line for line in out.splitlines() if line.strip()]) == 1  # the reply to "hello"
