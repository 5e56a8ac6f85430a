"""`vistune chat MODEL --image PATH [--prompt TEXT]`: one answer, or an interactive multi-turn session.

In a session, `/image PATH` attaches an image to your next message, `/reset` starts over and `/quit`
(or end of input) leaves. Replies stream token by token. Each follow-up turn reuses the keys and
values of the conversation so far (`vistune.infer.prefix`): only the new message is read, and images
already in the conversation are not encoded again.

Every turn is checked against the model's context as the server checks requests (`vistune.infer.context`):
a prompt that, with `--max-new-tokens`, does not fit is refused with the sizes, never cut. In a session a
refused message, an unreadable image or a line that is not UTF-8 is reported and the session goes on.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Callable, Iterator

from PIL import Image
from transformers import TextStreamer
from transformers.generation.streamers import BaseStreamer

from vistune.data.images import ImageError, load_image
from vistune.data.records import IMAGE_PLACEHOLDER, Turn
from vistune.infer.context import context_length, token_budget
from vistune.infer.generate import Generator, load_generator
from vistune.model.template import RenderError

MB = 2**20


class Session:
    """A multi-turn conversation: the turns so far, the images they refer to, and (with prefix reuse)
    the keys and values of the conversation up to the last answer.

    `prefix_cache_bytes` caps the memory those keys and values may take (0: recompute every turn)."""

    def __init__(self, generator: Generator, system: str | None = None, prefix_cache_bytes: int = 1024 * MB):
        self.generator = generator
        self.system = system
        self.prefixes = generator.prefix_cache(prefix_cache_bytes)
        self.reset()

    def reset(self) -> None:
        """Start over: no turns but the system prompt, no images, no kept keys and values."""
        self.turns: list[Turn] = [Turn("system", self.system)] if self.system else []
        self.images: list[Image.Image] = []
        self.image_keys: list[str] = []  # one name per attached image, for prefix matching
        if self.prefixes is not None:
            self.prefixes.clear()

    def ask(
        self,
        text: str,
        images: list[Image.Image] = (),
        stream: bool = False,
        streamer: BaseStreamer | None = None,
        **sampling,
    ) -> str:
        """Add a user turn (with its images' placeholders in front) and return the reply.

        `stream` prints the reply as it comes; `streamer` (instead) gets its token ids as they come.
        The turn and its images join the conversation only once the reply exists, so a failed
        generation leaves the session as it was (but for kept keys and values: the next turn may
        recompute)."""
        content = "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + text
        # The turn says how many images it holds: an `<image>` typed in any message stays text.
        turns, all_images = [*self.turns, Turn("user", content, len(images))], [*self.images, *images]
        self.check_context(turns, len(all_images), sampling.get("max_new_tokens", 64))
        # A session's images never change once attached, so a fresh name per attachment is as exact as
        # a content hash (`image_key`), which would cost ~130 ms on a 12-megapixel picture's first turn.
        keys = [*self.image_keys, *(uuid.uuid4().hex for _ in images)] if self.prefixes is not None else None
        if stream and streamer is None:
            streamer = TextStreamer(self.generator.tokenizer, skip_prompt=True, skip_special_tokens=True)
        reply = self.generator.generate(
            [turns], [all_images], streamer=streamer, prefixes=self.prefixes,
            image_keys=[keys] if keys is not None else None, **sampling,
        )[0]  # fmt: skip
        self.turns, self.images = [*turns, Turn("assistant", reply)], all_images
        self.image_keys = keys or []
        return reply

    def check_context(self, turns: list[Turn], num_images: int, max_new_tokens: int) -> None:
        """Raise a ContextError (a ValueError) when `turns` and `max_new_tokens` do not fit the context."""
        prompt = self.generator.prompt_ids(turns, num_images)
        token_budget(
            len(prompt), max_new_tokens, context_length(self.generator.llm.config),
            asked_name="--max-new-tokens", shorten="shorten it (in a session, /reset starts over)",
        )  # fmt: skip


class BadLine(str):
    """A line of standard input that is not UTF-8 (its text says so)."""


def _lines() -> Iterator[str]:
    """Lines typed at a prompt, or piped in; a line that is not UTF-8 comes as a `BadLine`."""
    if not sys.stdin.isatty():
        stream = getattr(sys.stdin, "buffer", None)
        for number, line in enumerate(stream if stream is not None else sys.stdin, 1):
            try:
                yield line.decode("utf-8") if isinstance(line, bytes) else line
            except UnicodeDecodeError:
                yield BadLine(f"line {number} of standard input is not UTF-8 text; skipped")
        return
    while True:
        try:
            yield input("> ")
        except UnicodeDecodeError:
            yield BadLine("that line is not UTF-8 text; skipped")
        except EOFError:
            return


def _number(
    kind: type, low: float, high: float | None = None, low_open: bool = False
) -> Callable[[str], float]:
    """argparse type: a `kind` number >= low (> low with `low_open`) and <= high."""
    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text!r}") from None
        if value < low or (low_open and value == low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected a number {bounds}, got {text}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vistune chat", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a vistune model dir, or an LLM (hub id, local dir, smollm2)")
    parser.add_argument("--image", action="append", default=[], help="image for the first message")
    parser.add_argument("--prompt", help="answer this once and exit (otherwise: interactive)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--temperature", type=_number(float, 0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0, help="in (0, 1]")
    parser.add_argument("--max-new-tokens", type=_number(int, 1), default=128)
    parser.add_argument(
        "--prefix-cache-mb", type=_number(float, 0), default=1024.0,
        help="memory for the conversation's keys and values, reused by each follow-up turn (0: recompute)",
    )  # fmt: skip
    return parser


def main_chat(argv: list[str] | None = None) -> int:
    """`vistune chat`: talk with a trained model dir (or a plain LLM such as `smollm2`)."""
    args = _parser().parse_args(argv)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}
    generator = load_generator(args.model, batch_size=1)
    session = Session(generator, args.system, int(args.prefix_cache_mb * MB))
    if args.image and session.generator.vlm is None:
        raise ValueError(
            f"{args.model}: a plain language model cannot take --image; give a vistune model dir"
        )
    _check_flags(session, args)
    pending = [load_image(p) for p in args.image]
    if args.prompt is not None:
        session.ask(args.prompt, pending, stream=True, **sampling)
        return 0
    print("Type a message; /image PATH attaches an image, /reset, /quit.", file=sys.stderr)
    _converse(session, pending, sampling)
    return 0


def _converse(session: Session, pending: list[Image.Image], sampling: dict) -> None:
    """The interactive loop: commands and messages until /quit or the end of input."""
    for line in _lines():
        if isinstance(line, BadLine):  # reported; the session goes on
            print(f"error: {line}", file=sys.stderr)
            continue
        line = line.strip()
        if line in ("/quit", "/exit"):
            break
        if line == "/reset":  # start over: images waiting for the next message go too
            session.reset()
            pending = []
        elif line == "/image":  # not a message to the model
            print("error: /image needs a path: /image PATH", file=sys.stderr)
        elif line.startswith("/image "):
            try:
                pending.append(load_image(line[len("/image ") :].strip()))
            except ImageError as err:  # a mistyped path must not end the session
                print(f"error: {err}", file=sys.stderr)
        elif line:
            try:
                session.ask(line, pending, stream=True, **sampling)
                pending = []
            except (RenderError, ValueError) as err:  # too long for the context, not valid text
                print(f"error: {err}", file=sys.stderr)


def _check_flags(session: Session, args: argparse.Namespace) -> None:
    """Before any message: --max-new-tokens and --system (with an empty message) fit the context."""
    context = context_length(session.generator.llm.config)
    if context is not None and args.max_new_tokens >= context:
        raise ValueError(
            f"--max-new-tokens {args.max_new_tokens} leaves no room for a prompt in the model's context "
            f"({context} tokens)"
        )
    if args.system:
        try:
            session.check_context([*session.turns, Turn("user", "", 0)], 0, args.max_new_tokens)
        except ValueError as err:
            message = f"--system: {err}".replace(" (in a session, /reset starts over)", "")
            raise ValueError(message) from None
