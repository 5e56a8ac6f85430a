"""Chat sessions: `vistune chat` driven through stdin (/image, /reset, /quit, --prompt) and Session itself."""

from __future__ import annotations

import io
import sys
from types import SimpleNamespace

import pytest
from PIL import Image

from vistune.data.records import Turn
from vistune.infer.generate import Generator, load_generator
from vistune.infer.session import Session, main_chat
from vistune.model.template import render
from vistune.model.vlm import save_vlm

RED, BLUE = (220, 30, 30), (30, 70, 220)
FLAGS = ["--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def model_dir(tiny_vlm, tmp_path_factory):
    """A saved tiny VLM, with a red and a blue picture beside it."""
    root = tmp_path_factory.mktemp("chat")
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), root / "m")
    Image.new("RGB", (24, 12), RED).save(root / "red.png")
    Image.new("RGB", (12, 24), BLUE).save(root / "blue.png")
    return root / "m"


def _colours(images) -> list[tuple]:
    """Each image's top-left pixel: which of the test pictures it is."""
    return [im.getpixel((0, 0)) for im in images]


@pytest.fixture
def calls(monkeypatch):
    """Record each Session.ask (text, image colours, turns before and after, reply) and each generate call."""
    log = {"ask": [], "generate": []}
    ask, generate = Session.ask, Generator.generate

    def recording_ask(self, text, images=(), stream=False, **sampling):
        before = list(self.turns)
        reply = ask(self, text, images, stream=stream, **sampling)
        after = list(self.turns)
        entry = {"text": text, "images": _colours(images), "before": before, "after": after, "reply": reply}
        log["ask"].append(entry | {"stream": stream, "sampling": sampling})
        return reply

    def recording_generate(self, conversations, images=None, **kwargs):
        rows = [_colours(row) for row in images or []]
        reuse = kwargs.get("prefixes") is not None
        log["generate"].append({"turns": [list(c) for c in conversations], "images": rows, "reuse": reuse})
        return generate(self, conversations, images, **kwargs)

    monkeypatch.setattr(Session, "ask", recording_ask)
    monkeypatch.setattr(Generator, "generate", recording_generate)
    return log


def _chat(monkeypatch, model_dir, typed: str, *args: str) -> int:
    monkeypatch.setattr(sys, "stdin", io.StringIO(typed))
    assert not sys.stdin.isatty()
    return main_chat([str(model_dir), *FLAGS, *args])


def _printed_replies(out: str) -> list[str]:
    """Streamed replies: one per line (TextStreamer ends each with a newline)."""
    return [line.strip() for line in out.splitlines()]


def test_image_goes_with_the_first_message_reset_clears_quit_stops(monkeypatch, capsys, calls, model_dir):
    root = model_dir.parent
    typed = f"/image {root / 'red.png'}\nwhat colour?\n/reset\nhello\n/quit\nnot answered\n"
    assert _chat(monkeypatch, model_dir, typed) == 0
    asks = calls["ask"]
    assert [a["text"] for a in asks] == ["what colour?", "hello"]  # nothing after /quit
    assert all(a["reply"] for a in asks)
    assert asks[0]["images"] == [RED] and asks[1]["images"] == []
    assert asks[0]["before"] == [] and asks[1]["before"] == []  # /reset dropped the first exchange
    assert [t.role for t in asks[0]["after"]] == ["user", "assistant"]
    assert asks[0]["after"][0] == Turn("user", "<image>\nwhat colour?", 1)
    assert all(a["stream"] and a["sampling"]["max_new_tokens"] == 4 for a in asks)
    gens = calls["generate"]
    assert [g["turns"] for g in gens] == [
        [[Turn("user", "<image>\nwhat colour?", 1)]],
        [[Turn("user", "hello", 0)]],
    ]
    assert [g["images"] for g in gens] == [[[RED]], [[]]]
    captured = capsys.readouterr()
    assert _printed_replies(captured.out) == [a["reply"] for a in asks]
    assert "/image PATH attaches an image" in captured.err


def test_images_attach_to_the_next_message_and_the_conversation_continues(
    monkeypatch, capsys, calls, model_dir
):
    root = model_dir.parent
    typed = f"/image {root / 'red.png'}\n\n/image {root / 'blue.png'}\n  first  \n\nsecond\n"  # then EOF
    assert _chat(monkeypatch, model_dir, typed) == 0
    asks = calls["ask"]
    assert [a["text"] for a in asks] == ["first", "second"]  # blank lines are skipped, text stripped
    assert asks[0]["images"] == [RED, BLUE] and asks[1]["images"] == []
    first_reply = asks[0]["reply"]
    assert asks[1]["before"] == [Turn("user", "<image>\n<image>\nfirst", 2), Turn("assistant", first_reply)]
    assert calls["generate"][1]["turns"][0][-1] == Turn("user", "second", 0)
    assert calls["generate"][1]["images"] == [[RED, BLUE]]  # the session's images travel with every turn
    assert _printed_replies(capsys.readouterr().out) == [first_reply, asks[1]["reply"]]


def test_prefix_reuse_is_on_by_default_and_gives_the_same_replies(monkeypatch, capsys, calls, model_dir):
    typed = f"/image {model_dir.parent / 'red.png'}\nwhat colour?\nare you sure?\nand now?\n"
    assert _chat(monkeypatch, model_dir, typed) == 0
    with_reuse = _printed_replies(capsys.readouterr().out)
    assert _chat(monkeypatch, model_dir, typed, "--prefix-cache-mb", "0") == 0
    assert _printed_replies(capsys.readouterr().out) == with_reuse
    assert [g["reuse"] for g in calls["generate"]] == [True] * 3 + [False] * 3


def test_exit_and_end_of_input_leave(monkeypatch, calls, model_dir):
    assert _chat(monkeypatch, model_dir, "hi\n/exit\nignored\n") == 0
    assert _chat(monkeypatch, model_dir, "") == 0
    assert [a["text"] for a in calls["ask"]] == ["hi"]


def test_a_bad_image_path_does_not_end_the_session(monkeypatch, capsys, calls, model_dir):
    missing = model_dir.parent / "missing.png"
    assert _chat(monkeypatch, model_dir, f"/image {missing}\nhello\n/quit\n") == 0
    assert [(a["text"], a["images"]) for a in calls["ask"]] == [("hello", [])]
    err = capsys.readouterr().err
    assert str(missing) in err and "missing image" in err


def test_prompt_answers_once_and_exits(monkeypatch, capsys, calls, model_dir):
    stdin = io.StringIO("this is never read\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    red = str(model_dir.parent / "red.png")
    args = [str(model_dir), "--image", red, "--prompt", "what colour?", "--system", "Be brief.", *FLAGS]
    assert main_chat(args) == 0
    assert [(a["text"], a["images"]) for a in calls["ask"]] == [("what colour?", [RED])]
    assert calls["generate"][0]["turns"] == [
        [Turn("system", "Be brief."), Turn("user", "<image>\nwhat colour?", 1)]
    ]
    assert stdin.read() == "this is never read\n"  # the prompt mode does not read stdin
    captured = capsys.readouterr()
    assert _printed_replies(captured.out) == [calls["ask"][0]["reply"]]
    assert "Type a message" not in captured.err


@pytest.fixture(scope="module")
def generator(model_dir) -> Generator:
    return load_generator(str(model_dir), batch_size=1, device="cpu")


def test_session_keeps_the_conversation(generator, calls):
    session = Session(generator, system="Answer in one word.")
    red, blue = Image.new("RGB", (16, 16), RED), Image.new("RGB", (20, 10), BLUE)
    first = session.ask("What is this?", [red], max_new_tokens=3)
    second = session.ask("And this one?", [blue], max_new_tokens=3)
    third = session.ask("Thanks.", max_new_tokens=3)
    assert [t.role for t in session.turns] == ["system"] + ["user", "assistant"] * 3
    assert [t.content for t in session.turns[1:]] == [
        "<image>\nWhat is this?",
        first,
        "<image>\nAnd this one?",
        second,
        "Thanks.",
        third,
    ]
    assert session.images == [red, blue]
    assert [g["images"] for g in calls["generate"]] == [[[RED]], [[RED, BLUE]], [[RED, BLUE]]]
    assert calls["generate"][2]["turns"][0] == session.turns[:-1]  # the whole history, up to the question
    session.reset()
    assert session.turns == [Turn("system", "Answer in one word.")] and session.images == []


def test_session_reply_is_the_greedy_answer(generator):
    """A session's first answer is what the generator gives for that conversation alone."""
    image = Image.new("RGB", (16, 16), BLUE)
    reply = Session(generator).ask("Describe it.", [image], max_new_tokens=4)
    expected = generator.generate([[Turn("user", "<image>\nDescribe it.")]], [[image]], max_new_tokens=4)
    assert reply == expected[0]


def test_a_failed_generation_leaves_the_session_as_it_was():
    class Failing:
        tokenizer = None
        llm = SimpleNamespace(config=None)  # no context to check

        def prefix_cache(self, max_bytes):
            return None

        def prompt_ids(self, turns, num_images):
            return [1]

        def generate(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    session = Session(Failing())
    with pytest.raises(RuntimeError, match="out of memory"):
        session.ask("hello", [Image.new("RGB", (4, 4))])
    assert session.turns == [] and session.images == []


def test_reset_also_drops_images_waiting_for_the_next_message(monkeypatch, calls, model_dir):
    typed = f"/image {model_dir.parent / 'red.png'}\n/reset\nhello\n"
    assert _chat(monkeypatch, model_dir, typed) == 0
    assert [a["images"] for a in calls["ask"]] == [[]]


def test_a_typed_placeholder_does_not_capture_a_later_image(monkeypatch, calls, model_dir):
    """Issue 18: "what does <image> mean?" followed by /image puts the image in the later turn."""
    typed = f"what does <image> mean?\n/image {model_dir.parent / 'red.png'}\nand this?\n"
    assert _chat(monkeypatch, model_dir, typed) == 0
    last = calls["generate"][-1]["turns"][0]
    generator = load_generator(str(model_dir), batch_size=1)
    vlm = generator.vlm
    rendered = render(last, vlm.tokenizer, image_tokens=vlm.image_tokens, num_images=1, generation=True)
    ids = rendered.input_ids
    first_user_end = ids.index(vlm.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert vlm.image_token_id not in ids[:first_user_end]  # the typed text stays text
    assert ids.count(vlm.image_token_id) == vlm.image_tokens  # the image sits in the later turn
