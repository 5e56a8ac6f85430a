"""Time to first token of follow-up chat turns, with the conversation's key/value prefix reused or not.

    python benchmarks/chat_followup.py MODEL [--sizes 1155x866,4000x3000] [--turns 4] [--repeats 3]

Runs the same conversation through `vistune chat`'s `Session` (a photo-like picture in the first turn,
then follow-up questions about it), once with prefix reuse (the default: each turn computes only its
new tokens; images already in the conversation are not encoded again) and once recomputing (the
session's behaviour before: every turn encodes the images and reads the whole conversation). The
modes alternate within each repeat, so drift on a shared machine hits both. Prints per turn the
prompt tokens, the tokens reused, the median time to first token of each mode and their ratio, and
whether the greedy answers were identical. Times are measured from `Session.ask` to the first new
token handed to a streamer: rendering, image keys, the tower, the prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers.generation.streamers import BaseStreamer

from vistune.infer.generate import load_generator
from vistune.infer.session import Session

QUESTIONS = [
    "What color is the circle?",
    "How many objects are there?",
    "Is there a star?",
    "Describe the image.",
    "What is the largest object?",
    "Are there two squares?",
]


class FirstToken(BaseStreamer):
    """Notes when `generate` hands over its first new token (its first `put` is the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like picture: smooth shapes and gradients plus sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y + 2 * x), np.sin(4 * (x + y))], -1) * 90 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8))


def conversation(session: Session, image: Image.Image, turns: int, max_new_tokens: int) -> list[dict]:
    """One conversation from a fresh start: per turn its TTFT, prompt and reused tokens, and answer."""
    session.reset()
    out = []
    for k in range(turns):
        streamer, reused = FirstToken(), session.prefixes.reused_tokens if session.prefixes else 0
        started = time.perf_counter()
        answer = session.ask(QUESTIONS[k % len(QUESTIONS)], [image] if k == 0 else [], streamer=streamer,
                             max_new_tokens=max_new_tokens)  # fmt: skip
        prompt = len(session.generator.prompt_ids(session.turns[:-1], len(session.images)))
        now_reused = session.prefixes.reused_tokens if session.prefixes else 0
        out.append({"ttft": streamer.at - started, "prompt": prompt, "reused": now_reused - reused,
                    "answer": answer})  # fmt: skip
    return out


def measure(generator, image: Image.Image, args) -> dict[str, list[list[dict]]]:
    """Alternating repeats of the conversation, with reuse and recomputing."""
    sessions = {"reuse": Session(generator), "recompute": Session(generator, prefix_cache_bytes=0)}
    runs: dict[str, list[list[dict]]] = {mode: [] for mode in sessions}
    for _ in range(args.repeats):
        for mode, session in sessions.items():
            runs[mode].append(conversation(session, image, args.turns, args.max_new_tokens))
    return runs


def report(label: str, runs: dict[str, list[list[dict]]]) -> None:
    median = lambda mode, k: statistics.median(run[k]["ttft"] for run in runs[mode])  # noqa: E731
    first = runs["reuse"][0]
    print(f"\n[{label}] median of {len(runs['reuse'])} conversations")
    print("  turn  prompt tokens  reused   TTFT reuse  TTFT recompute  recompute / reuse")
    for k, turn in enumerate(first):
        reuse, recompute = median("reuse", k), median("recompute", k)
        print(f"  {k + 1:>4}  {turn['prompt']:>13}  {turn['reused']:>6}  {reuse * 1000:>8.0f} ms  "
              f"{recompute * 1000:>11.0f} ms  {recompute / reuse:>16.2f}x")  # fmt: skip
    follow = range(1, len(first))
    reuse = statistics.median(run[k]["ttft"] for run in runs["reuse"] for k in follow)
    recompute = statistics.median(run[k]["ttft"] for run in runs["recompute"] for k in follow)
    same = all(
        [t["answer"] for t in run] == [t["answer"] for t in runs["recompute"][0]]
        for mode in runs
        for run in runs[mode]
    )
    print(
        f"  follow-ups (2-{len(first)}): TTFT {reuse * 1000:.0f} ms with reuse, {recompute * 1000:.0f} ms "
        f"recomputing: {recompute / reuse:.2f}x faster; greedy answers identical: {'yes' if same else 'NO'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a vistune model dir (e.g. the quickstart's OUT/model)")
    parser.add_argument("--sizes", default="1155x866,4000x3000", help="WxH of the pictures, comma-separated")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", help="cpu, cuda ... (default: cuda when available)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    generator = load_generator(args.model, batch_size=1, device=args.device)
    device = generator.device
    print(f"model {args.model} on {device}, {torch.get_num_threads()} threads, {args.turns} turns, "
          f"max_new_tokens {args.max_new_tokens}")  # fmt: skip
    measure(generator, photo(320, 240), argparse.Namespace(**{**vars(args), "repeats": 1}))  # warm-up
    for size in args.sizes.split(","):
        width, height = map(int, size.split("x"))
        runs = measure(generator, photo(width, height), args)
        report(f"{width}x{height} ({width * height / 1e6:.1f} MP)", runs)


if __name__ == "__main__":
    main()
